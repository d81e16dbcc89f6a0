#!/usr/bin/env bash
# A long run of mixed load at 80% of saturation: the MLP (tensor handler, batch 8) and
# ResNet-18 behind image_classifier (batch 4) in one server, every 4th request a 640x480 JPEG,
# plus a management cycle every 10 s (register, predict, scale to 2 and back to 1, unregister).
# Prints one JSON line per minute (requests, errors, p50/p99 per kind, server RSS) and a
# summary; everything is also written to build/soak/soak.jsonl.
# Usage: bench/soak.sh [MINUTES, default 30]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
minutes=${1:-30}
bin=target/release
out=build/bench
soak=build/soak
store=$soak/store
home=$soak/home

make --no-print-directory archives >/dev/null
cargo build --release -p tchserve-bench --bins >/dev/null 2>&1
[ -f "$out/resnet18.pt" ] || .venv/bin/python bench/make_models.py "$out"
rm -rf "$soak"; mkdir -p "$store" "$home"
"$bin/tch-model-archiver" --model-name mlp --version 1.0 --serialized-file "$out/mlp.pt" \
    --handler bench/mlp_handler.json --export-path "$store" --force
"$bin/tch-model-archiver" --model-name image --version 1.0 --serialized-file "$out/resnet18.pt" \
    --handler image_classifier --export-path "$store" --force

cat > "$home/config.properties" <<CFG
model_store=$root/$store
enable_model_api=true
disable_token_authorization=true
models={"mlp": {"1.0": {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5}}, "image": {"1.0": {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 20}}}
CFG
cd "$home"
server() { "$root/$bin/tchserve" "$@" --ncs --log-dir "$root/$home/logs"; }
trap 'server --stop >/dev/null 2>&1 || true' EXIT
server --start --models mlp=mlp.mar image=image.mar >/dev/null
pid=$(head -n 1 logs/tchserve.pid)
echo "{\"machine\": \"$(lscpu | sed -n 's/^Model name: *//p')\", \"cores\": $(nproc), \"server_pid\": $pid}" | tee "$root/$soak/soak.jsonl"
"$root/$bin/soak" --pid "$pid" --minutes "$minutes" \
    --mlp-body "$root/$out/mlp.json" --image-body "$root/$out/cat640.jpg" \
    --mlp-path /predictions/mlp --image-path /predictions/image --archive mlp.mar \
    | tee -a "$root/$soak/soak.jsonl"
