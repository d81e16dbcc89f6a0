#!/usr/bin/env bash
# Several models in one server: does another model, once it has served and gone idle, slow a
# big one down? One server, token authorization off, ResNet-18 behind image_classifier and the
# MLP behind a tensor handler, one worker each:
#   1. ResNet-18 at concurrency 1 with a 640x480 JPEG;
#   2. the MLP registered, then 8 s of it at concurrency 64 (batch 8, delay 5 ms);
#   3. ResNet-18 at concurrency 1 again;
#   4. a second ResNet-18 registered (image2), then 4 s of it at concurrency 1;
#   5. the first ResNet-18 at concurrency 1 again.
# Prints each figure as a JSON line, then the ratios of 3 and 5 to 1 (the target is >= 0.95).
# Usage: bench/multi_model.sh [seconds per measurement, default 10]
# TCHSERVE=path runs another build of the server (an absolute path).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-10}
bin=target/release
out=build/bench
store=$out/multi-store
home=$out/multi-home

make --no-print-directory archives >/dev/null
cargo build --release -p tchserve-bench --bins >/dev/null 2>&1
[ -f "$out/resnet18.pt" ] || .venv/bin/python bench/make_models.py "$out"
rm -rf "$store" "$home"; mkdir -p "$store" "$home"
"$bin/tch-model-archiver" --model-name mlp --version 1.0 --serialized-file "$out/mlp.pt" \
    --handler bench/mlp_handler.json --export-path "$store" --force
"$bin/tch-model-archiver" --model-name resnet18_img --version 1.0 --serialized-file "$out/resnet18.pt" \
    --handler image_classifier --export-path "$store" --force

cat > "$home/config.properties" <<CFG
model_store=$root/$store
enable_model_api=true
disable_token_authorization=true
CFG
cd "$home"
server() { "${TCHSERVE:-$root/$bin/tchserve}" "$@" --ncs --log-dir "$root/$home/logs"; }
load() { "$root/$bin/loadgen" --warmup 2 "$@"; }
register() { curl -s -o /dev/null -X POST "localhost:8081/models?url=$1&model_name=$2&initial_workers=1&batch_size=$3&max_batch_delay=$4&synchronous=true"; }
throughput() { python3 -c 'import json, sys; print(json.loads(sys.argv[1])["rps"])' "$1"; }
trap 'server --stop >/dev/null 2>&1 || true' EXIT

server --start >/dev/null
register resnet18_img.mar image 1 0
image() { load --path /predictions/image --body "$root/$out/cat640.jpg" --content-type image/jpeg -c 1 --duration "$secs"; }
before=$(image)
echo "{\"bench\": \"multi_image_c1_before\", \"result\": $before}"
register mlp.mar mlp 8 5
burst=$(load --path /predictions/mlp --body "$root/$out/mlp.json" -c 64 --duration 8)
echo "{\"bench\": \"multi_mlp_c64_b8_burst\", \"result\": $burst}"
after=$(image)
echo "{\"bench\": \"multi_image_c1_after\", \"result\": $after}"
register resnet18_img.mar image2 1 0
other=$(load --path /predictions/image2 --body "$root/$out/cat640.jpg" --content-type image/jpeg -c 1 --duration 4)
echo "{\"bench\": \"multi_image2_c1\", \"result\": $other}"
after_big=$(image)
echo "{\"bench\": \"multi_image_c1_after_image2\", \"result\": $after_big}"
ratio() { python3 -c "import sys; print(round(float(sys.argv[2]) / float(sys.argv[1]), 3))" "$@"; }
echo "{\"bench\": \"multi_image_after_mlp_over_before\", \"ratio\": $(ratio "$(throughput "$before")" "$(throughput "$after")")}"
echo "{\"bench\": \"multi_image_after_image2_over_before\", \"ratio\": $(ratio "$(throughput "$before")" "$(throughput "$after_big")")}"
