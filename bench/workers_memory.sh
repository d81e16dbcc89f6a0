#!/usr/bin/env bash
# Memory per worker: ResNet-18 (47 MB of weights, tensor handler) scaled to 1, 4 and 16 CPU
# workers in one server; after each scale, 3 s of load at concurrency 16 so that every worker
# has run forwards, then the server's RSS. Prints JSON lines and the MB each worker beyond the
# first costs.
# Usage: bench/workers_memory.sh            (BIN=path/to/tchserve to measure another build)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${BIN:-$root/target/release/tchserve}
out=build/bench
store=$out/workers-store
home=$out/workers-home

cargo build --release -p tchserve-bench --bins >/dev/null 2>&1
[ -f "$out/resnet18.pt" ] || .venv/bin/python bench/make_models.py "$out"
rm -rf "$store" "$home"; mkdir -p "$store" "$home"
target/release/tch-model-archiver --model-name resnet18 --version 1.0 --serialized-file "$out/resnet18.pt" \
    --handler bench/resnet18_handler.json --export-path "$store" --force
cat > "$home/config.properties" <<CFG
model_store=$root/$store
enable_model_api=true
disable_token_authorization=true
CFG
cd "$home"
"$bin" --foreground --ncs --log-dir "$root/$home/logs" >"$root/$home/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
until curl -s -o /dev/null localhost:8080/ping; do sleep 0.1; done
curl -s -o /dev/null -X POST "localhost:8081/models?url=resnet18.mar&initial_workers=1&batch_size=1&synchronous=true"
rss() { awk '/VmRSS/{print int($2/1024)}' "/proc/$pid/status"; }
first=
for n in 1 4 16; do
    curl -s -o /dev/null -X PUT "localhost:8081/models/resnet18?min_worker=$n&max_worker=$n&synchronous=true"
    "$root/target/release/loadgen" --duration 3 --warmup 0 --path /predictions/resnet18 \
        --body "$root/$out/resnet18.bin" --content-type application/octet-stream -c 16 >/dev/null
    mb=$(rss)
    first=${first:-$mb}
    per=$([ "$n" -gt 1 ] && echo "scale=1; ($mb - $first) / ($n - 1)" | bc || echo 0)
    echo "{\"bench\": \"resnet18_workers\", \"workers\": $n, \"rss_mb\": $mb, \"mb_per_extra_worker\": $per}"
done
