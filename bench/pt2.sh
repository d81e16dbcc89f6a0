#!/usr/bin/env bash
# The same models as TorchScript files and as .pt2 packages (torch.export + AOTInductor), served
# side by side in one server at batch 1 and 8, beside the in-process ceiling of each format.
# Models: the bench MLP and ResNet-18 (bench/make_models.py), compiled by bench/make_pt2.py
# (about a minute, once); ResNet-18 also as a package with a fixed batch of 1, since the dynamic
# one takes 2 to 15 examples per forward and pads a single one to 2.
# Each case: the ceiling, then the server under load, then the ceiling again; prints JSON lines.
# Usage: bench/pt2.sh [seconds per measurement, default 10]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-10}
bin=target/release
out=build/bench
store=$out/pt2-store
home=$out/pt2-home

make --no-print-directory archives >/dev/null
cargo build --release -p tchserve-bench --bins >/dev/null 2>&1
[ -f "$out/resnet18.pt" ] || .venv/bin/python bench/make_models.py "$out"
[ -f "$out/resnet18_b1.pt2" ] || .venv/bin/python bench/make_pt2.py "$out"
rm -rf "$store" "$home"; mkdir -p "$store" "$home"
archive() { "$bin/tch-model-archiver" --model-name "$1" --version 1.0 --serialized-file "$out/$2" --handler "$3" --export-path "$store" --force; }
archive mlp_ts mlp.pt bench/mlp_handler.json
archive mlp_pt2 mlp.pt2 bench/mlp_handler.json
archive resnet18_ts resnet18.pt bench/resnet18_handler.json
archive resnet18_pt2 resnet18.pt2 bench/resnet18_handler.json
archive resnet18_pt2_fixed1 resnet18_b1.pt2 bench/resnet18_handler.json

echo "{\"machine\": \"$(lscpu | sed -n 's/^Model name: *//p')\", \"cores\": $(nproc), \"seconds_per_run\": $secs}"
cat > "$home/config.properties" <<CFG
model_store=$root/$store
enable_model_api=true
disable_token_authorization=true
CFG
cd "$home"
server() { "$root/$bin/tchserve" "$@" --ncs --log-dir "$root/$home/logs"; }
load() { "$root/$bin/loadgen" --duration "$secs" --warmup 2 "$@"; }
register() { curl -sf -o /dev/null -X POST "localhost:8081/models?url=$1.mar&model_name=$2&initial_workers=1&batch_size=$3&max_batch_delay=$4&synchronous=true"; }
ceiling() { "$root/$bin/ceiling" --model "$root/$out/$1" --shape "$2" --batch "$3" --duration "$secs"; }
trap 'server --stop >/dev/null 2>&1 || true' EXIT

# name, file, archive, example shape, body, content type, batch, clients, delay ms
cases=(
    "mlp_ts_b1 mlp.pt mlp_ts 784 mlp.json application/json 1 1 0"
    "mlp_pt2_b1 mlp.pt2 mlp_pt2 784 mlp.json application/json 1 1 0"
    "mlp_ts_b8 mlp.pt mlp_ts 784 mlp.json application/json 8 64 5"
    "mlp_pt2_b8 mlp.pt2 mlp_pt2 784 mlp.json application/json 8 64 5"
    "resnet18_ts_b1 resnet18.pt resnet18_ts 3,224,224 resnet18.bin application/octet-stream 1 1 0"
    "resnet18_pt2_b1 resnet18.pt2 resnet18_pt2 3,224,224 resnet18.bin application/octet-stream 1 1 0"
    "resnet18_pt2_fixed1_b1 resnet18_b1.pt2 resnet18_pt2_fixed1 3,224,224 resnet18.bin application/octet-stream 1 1 0"
    "resnet18_ts_b8 resnet18.pt resnet18_ts 3,224,224 resnet18.bin application/octet-stream 8 16 50"
    "resnet18_pt2_b8 resnet18.pt2 resnet18_pt2 3,224,224 resnet18.bin application/octet-stream 8 16 50"
)

server --start >/dev/null
for c in "${cases[@]}"; do
    read -r name _ mar _ _ _ batch _ delay <<<"$c"
    register "$mar" "$name" "$batch" "$delay"
done
for c in "${cases[@]}"; do
    read -r name file _ shape body type batch clients _ <<<"$c"
    echo "{\"bench\": \"${name}_ceiling_before\", \"result\": $(ceiling "$file" "$shape" "$batch")}"
    echo "{\"bench\": \"${name}_served\", \"result\": $(load --path "/predictions/$name" --body "$root/$out/$body" --content-type "$type" -c "$clients")}"
    echo "{\"bench\": \"${name}_ceiling_after\", \"result\": $(ceiling "$file" "$shape" "$batch")}"
done
pid=$(head -n 1 logs/tchserve.pid)
echo "{\"bench\": \"rss_all_nine_registrations\", \"rss_mb\": $(($(awk '/VmRSS/{print $2}' "/proc/$pid/status") / 1024))}"
