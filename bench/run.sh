#!/usr/bin/env bash
# Runs the benchmarks reported in docs/benchmarks.md and prints every figure as JSON lines.
# Everything runs on this machine over loopback: the server, the load generator, the ceiling.
# Usage: bench/run.sh [seconds per measurement, default 10]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-10}
bin=target/release
out=build/bench
store=$out/store
home=$out/home

make --no-print-directory archives >/dev/null
cargo build --release -p tchserve-bench --bins >/dev/null 2>&1
.venv/bin/python bench/make_models.py "$out"
rm -rf "$store" "$home"; mkdir -p "$store" "$home"
archive() { "$bin/tch-model-archiver" --model-name "$1" --version 1.0 --serialized-file "$2" --handler "$3" --export-path "$store" --force; }
archive mlp "$out/mlp.pt" bench/mlp_handler.json
archive resnet18 "$out/resnet18.pt" bench/resnet18_handler.json
cp model-store/digits.mar "$store/"

echo "{\"machine\": \"$(lscpu | sed -n 's/^Model name: *//p')\", \"cores\": $(nproc), \"memory_gb\": $(free -g | awk '/Mem:/{print $2}'), \"seconds_per_run\": $secs}"

cat > "$home/config.properties" <<CFG
model_store=$root/$store
enable_model_api=true
default_workers_per_model=1
# As in TorchServe's own benchmarks: the load generators send no keys.
disable_token_authorization=true
CFG
cd "$home"
server() { "$root/$bin/tchserve" "$@" --ncs --log-dir "$root/$home/logs"; }
predict() { curl -s -o /dev/null -w '%{http_code}' -X POST "localhost:8080/predictions/$1" -H "Content-Type: $2" --data-binary "@$3"; }

# Start-up: from --start until all three models answer a prediction; then the server's RSS.
printf '{"data": %s}' "$(python3 -c 'print([0.0]*64)')" > "$root/$out/digits.json"
t0=$(date +%s.%N)
server --start --models digits=digits.mar mlp=mlp.mar resnet18=resnet18.mar >/dev/null
until [ "$(predict digits application/json "$root/$out/digits.json")" = 200 ] \
   && [ "$(predict mlp application/json "$root/$out/mlp.json")" = 200 ] \
   && [ "$(predict resnet18 application/octet-stream "$root/$out/resnet18.bin")" = 200 ]; do sleep 0.01; done
t1=$(date +%s.%N)
pid=$(head -n 1 logs/tchserve.pid)
rss_kb=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
echo "{\"bench\": \"startup\", \"models\": 3, \"seconds_until_all_answer\": $(echo "$t1 - $t0" | bc), \"rss_mb\": $((rss_kb / 1024))}"
server --stop >/dev/null

load() { "$root/$bin/loadgen" --duration "$secs" --warmup 2 "$@"; }
register() { curl -s -o /dev/null -X POST "localhost:8081/models?url=$1&model_name=$2&initial_workers=1&batch_size=$3&max_batch_delay=$4"; }

server --start >/dev/null
register mlp.mar mlp_b1 1 0
register mlp.mar mlp_b8 8 5
echo "{\"bench\": \"mlp_c1_b1\", \"result\": $(load --path /predictions/mlp_b1 --body "$root/$out/mlp.json" -c 1)}"
echo "{\"bench\": \"mlp_c64_b1\", \"result\": $(load --path /predictions/mlp_b1 --body "$root/$out/mlp.json" -c 64)}"
echo "{\"bench\": \"mlp_c64_b8\", \"result\": $(load --path /predictions/mlp_b8 --body "$root/$out/mlp.json" -c 64)}"
server --stop >/dev/null
# ResNet-18 through the server, between two runs of the in-process ceiling (same machine state).
ceiling() { echo "{\"bench\": \"resnet18_ceiling_b8\", \"result\": $("$root/$bin/ceiling" --model "$root/$out/resnet18.pt" --shape 3,224,224 --batch 8 --duration "$secs")}"; }
ceiling
server --start >/dev/null
register resnet18.mar resnet18_b8 8 50
echo "{\"bench\": \"resnet18_c16_b8\", \"result\": $(load --path /predictions/resnet18_b8 --body "$root/$out/resnet18.bin" --content-type application/octet-stream -c 16)}"
server --stop >/dev/null
ceiling

# image_classifier: ResNet-18 behind the built-in handler, a 640x480 JPEG per request. The
# ceiling decodes, preprocesses and runs the forward in a plain loop at the same batch size.
"$root/$bin/tch-model-archiver" --model-name resnet18_img --version 1.0 --serialized-file "$root/$out/resnet18.pt" \
    --handler image_classifier --export-path "$root/$store" --force
image_ceiling() { "$root/$bin/image_ceiling" --image "$root/$out/cat640.jpg" --duration "$secs" "$@"; }
echo "{\"bench\": \"image_preprocess_one_core\", \"result\": $(image_ceiling --preprocess-only)}"
echo "{\"bench\": \"image_ceiling_b1\", \"result\": $(image_ceiling --model "$root/$out/resnet18.pt" --batch 1)}"
echo "{\"bench\": \"image_ceiling_b8\", \"result\": $(image_ceiling --model "$root/$out/resnet18.pt" --batch 8)}"
server --start >/dev/null
register resnet18_img.mar image_b1 1 0
register resnet18_img.mar image_b8 8 50
echo "{\"bench\": \"image_c1_b1\", \"result\": $(load --path /predictions/image_b1 --body "$root/$out/cat640.jpg" --content-type image/jpeg -c 1)}"
echo "{\"bench\": \"image_c8_b8\", \"result\": $(load --path /predictions/image_b8 --body "$root/$out/cat640.jpg" --content-type image/jpeg -c 8)}"
server --stop >/dev/null
echo "{\"bench\": \"image_ceiling_b1\", \"result\": $(image_ceiling --model "$root/$out/resnet18.pt" --batch 1)}"
echo "{\"bench\": \"image_ceiling_b8\", \"result\": $(image_ceiling --model "$root/$out/resnet18.pt" --batch 8)}"
