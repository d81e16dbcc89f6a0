#!/usr/bin/env bash
# Dynamic batching with several workers of one model: do the batches still fill? The MLP behind a
# tensor handler with batch_size 8 and max_batch_delay 20 ms, 8 clients sending back to back,
# with 1, 2 and 4 workers in turn (one server, scaled between runs). Prints each run as a JSON
# line with the mean batch size read from /metrics, then the throughput of 2 and 4 workers over
# 1 worker's (the target is >= 0.9: more workers must not make the batches smaller).
# Usage: bench/batch_workers.sh [seconds per measurement, default 5]
# TCHSERVE=path runs another build of the server (an absolute path).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-5}
bin=target/release
out=build/bench
store=$out/batch-store
home=$out/batch-home

cargo build --release --bins >/dev/null 2>&1
cargo build --release -p tchserve-bench --bins >/dev/null 2>&1
[ -f "$out/mlp.pt" ] || .venv/bin/python bench/make_models.py "$out"
rm -rf "$store" "$home"; mkdir -p "$store" "$home"
"$bin/tch-model-archiver" --model-name mlp --version 1.0 --serialized-file "$out/mlp.pt" \
    --handler bench/mlp_handler.json --export-path "$store" --force

cat > "$home/config.properties" <<CFG
model_store=$root/$store
enable_model_api=true
disable_token_authorization=true
CFG
cd "$home"
server() { "${TCHSERVE:-$root/$bin/tchserve}" "$@" --ncs --log-dir "$root/$home/logs"; }
trap 'server --stop >/dev/null 2>&1 || true' EXIT
server --start >/dev/null
curl -s -o /dev/null -X POST "localhost:8081/models?url=mlp.mar&initial_workers=1&batch_size=8&max_batch_delay=20&synchronous=true"

# Sum and count of the batch sizes the model ran, from tchserve's histogram.
batches() {
    curl -s localhost:8082/metrics | python3 -c '
import sys
s = c = 0.0
for line in sys.stdin:
    if line.startswith("tchserve_batch_size_sum{") and "model_name=\"mlp\"" in line: s = float(line.split()[-1])
    if line.startswith("tchserve_batch_size_count{") and "model_name=\"mlp\"" in line: c = float(line.split()[-1])
print(s, c)'
}
declare -A rps
for workers in 1 2 4; do
    curl -s -o /dev/null -X PUT "localhost:8081/models/mlp?min_worker=$workers&max_worker=$workers&synchronous=true"
    read -r s0 c0 <<<"$(batches)"
    result=$("$root/$bin/loadgen" --warmup 1 --path /predictions/mlp --body "$root/$out/mlp.json" -c 8 --duration "$secs")
    read -r s1 c1 <<<"$(batches)"
    mean=$(python3 -c "import sys; s0, c0, s1, c1 = map(float, sys.argv[1:]); print(round((s1 - s0) / max(c1 - c0, 1), 2))" "$s0" "$c0" "$s1" "$c1")
    echo "{\"bench\": \"batch8_c8_workers$workers\", \"mean_batch\": $mean, \"result\": $result}"
    rps[$workers]=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["rps"])' "$result")
done
ratio() { python3 -c "import sys; print(round(float(sys.argv[2]) / float(sys.argv[1]), 3))" "$@"; }
echo "{\"bench\": \"batch8_c8_workers2_over_workers1\", \"ratio\": $(ratio "${rps[1]}" "${rps[2]}")}"
echo "{\"bench\": \"batch8_c8_workers4_over_workers1\", \"ratio\": $(ratio "${rps[1]}" "${rps[4]}")}"
