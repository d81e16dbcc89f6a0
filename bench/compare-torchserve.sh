#!/usr/bin/env bash
# tchserve against TorchServe 0.12.0, one after the other on this machine, with the same models,
# the same config.properties, the same registrations and the same load generator (wrk, one
# thread, over loopback):
# - MLP (784-128-10), JSON body, batch size 1 at concurrency 1..64 and batch size 8 (5 ms delay)
#   at concurrency 8..64. tchserve serves it with bench/mlp_handler.json, TorchServe with
#   bench/torchserve/mlp_handler.py: it has no built-in handler for a JSON tensor.
# - ResNet-18 behind the built-in image_classifier handler, a 640x480 JPEG per request, from one
#   archive made by the real torch-model-archiver and served by both: batch size 1 at
#   concurrency 1 and 4, batch size 8 (50 ms delay) at concurrency 8 to 32.
# - Start-up: from the start command until the MLP and ResNet-18 both answer; then the memory
#   (proportional set size) of the server and all its processes, and again after the load.
# For every run: requests/s, p50 and p99 latency, and the requests per second of server CPU
# (the server's process tree; wrk's own CPU is not counted).
# Writes build/bench/compare/results.jsonl and PNG charts beside it (bench/compare_charts.py).
# TorchServe is installed on first use in build/torchserve-venv (see bench/torchserve/common.sh).
# Usage: bench/compare-torchserve.sh [seconds per run, default 10]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-10}
bin=$root/target/release
out=$root/build/bench
work=$out/compare
store=$work/store
home=$work/home
results=$work/results.jsonl
tsvenv=build/torchserve-venv

command -v wrk >/dev/null || { apt-get install -y -q wrk >/dev/null; }
. bench/torchserve/common.sh
ensure_torchserve
make --no-print-directory archives >/dev/null
cargo build --release -p tchserve-cli --bins >/dev/null 2>&1
[ -f "$out/cat640.jpg" ] || .venv/bin/python bench/make_models.py "$out"
rm -rf "$work"; mkdir -p "$store" "$home"
"$tsvenv/bin/torch-model-archiver" --model-name resnet18 --version 1.0 --serialized-file "$out/resnet18.pt" \
    --handler image_classifier --export-path "$store"
# The MLP: one archive per server, the same TorchScript file in both.
mkdir -p "$work/ts" "$work/tch"
"$tsvenv/bin/torch-model-archiver" --model-name mlp --version 1.0 --serialized-file "$out/mlp.pt" \
    --handler bench/torchserve/mlp_handler.py --export-path "$work/ts"
"$bin/tch-model-archiver" --model-name mlp --version 1.0 --serialized-file "$out/mlp.pt" \
    --handler bench/mlp_handler.json --export-path "$work/tch"

cat > "$home/config.properties" <<CFG
inference_address=http://127.0.0.1:8080
management_address=http://127.0.0.1:8081
metrics_address=http://127.0.0.1:8082
model_store=$store
default_workers_per_model=1
disable_token_authorization=true
enable_model_api=true
CFG

machine="$(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GB"
echo "{\"machine\": \"$machine\", \"seconds_per_run\": $secs, \"date\": \"$(date -u +%FT%TZ)\"}" | tee "$results"
tck=$(getconf CLK_TCK)

predict() { curl -s -o /dev/null -w '%{http_code}' -X POST "127.0.0.1:8080/predictions/$1" -H "Content-Type: $2" --data-binary "@$3"; }
register() {
    curl -s -o /dev/null -w '%{http_code}' -X POST \
        "127.0.0.1:8081/models?url=$1&model_name=$2&batch_size=$3&max_batch_delay=$4&initial_workers=1&synchronous=true"
}

# load SERVER PID CASE PATH BODY CONTENT_TYPE CONCURRENCY
load() {
    local server=$1 pid=$2 case=$3 path=$4 body=$5 ctype=$6 c=$7 before after report
    BODY=$body CTYPE=$ctype wrk -t1 -c"$c" -d2s -s "$root/bench/wrk_post.lua" "http://127.0.0.1:8080$path" >/dev/null
    before=$(cpu_tree "$pid")
    report=$(BODY=$body CTYPE=$ctype wrk -t1 -c"$c" -d"${secs}s" --latency -s "$root/bench/wrk_post.lua" "http://127.0.0.1:8080$path")
    after=$(cpu_tree "$pid")
    echo "$report" | awk -v server="$server" -v case="$case" -v c="$c" -v cpu="$(( after - before ))" \
        -v tck="$tck" -v secs="$secs" '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        /Requests\/sec/ { rps = $2 }
        $1 == "50%" { p50 = ms($2) }
        $1 == "99%" { p99 = ms($2) }
        /Non-2xx/ { bad = $NF }
        /Socket errors/ { errors = $0 }
        END {
            cpu_s = cpu / tck
            printf "{\"bench\": \"load\", \"server\": \"%s\", \"case\": \"%s\", \"concurrency\": %d, \"rps\": %.1f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, \"server_cpu_cores\": %.2f, \"requests_per_cpu_second\": %.0f, \"non_2xx\": %d}\n",
                server, case, c, rps, p50, p99, cpu_s / secs, (cpu_s > 0 ? rps * secs / cpu_s : 0), bad + 0
        }' | tee -a "$results"
}

# run SERVER START_COMMAND... : starts the server, times it until both models answer, loads it.
run() {
    local server=$1; shift
    cd "$home"
    local t0 t1 pid
    t0=$(date +%s.%N)
    "$@" >"$work/$server.log" 2>&1 &
    pid=$!
    until [ "$(predict mlp application/json "$out/mlp.json" 2>/dev/null)" = 200 ] \
       && [ "$(predict resnet18 image/jpeg "$out/cat640.jpg" 2>/dev/null)" = 200 ]; do
        kill -0 "$pid" 2>/dev/null || { echo "$server exited; see $work/$server.log" >&2; exit 1; }
        sleep 0.05
    done
    t1=$(date +%s.%N)
    echo "{\"bench\": \"startup\", \"server\": \"$server\", \"seconds_until_both_answer\": $(printf %.3f "$(echo "$t1 - $t0" | bc)"), \"pss_mb\": $(pss_tree "$pid")}" | tee -a "$results"
    for reg in "mlp.mar mlp_b1 1 0" "mlp.mar mlp_b8 8 5" "resnet18.mar image_b1 1 0" "resnet18.mar image_b8 8 50"; do
        # shellcheck disable=SC2086
        [ "$(register $reg)" = 200 ] || { echo "$server: registering $reg failed" >&2; exit 1; }
    done
    for c in 1 4 16 64; do load "$server" "$pid" mlp_b1 /predictions/mlp_b1 "$out/mlp.json" application/json "$c"; done
    for c in 8 16 64; do load "$server" "$pid" mlp_b8 /predictions/mlp_b8 "$out/mlp.json" application/json "$c"; done
    for c in 1 4; do load "$server" "$pid" image_b1 /predictions/image_b1 "$out/cat640.jpg" image/jpeg "$c"; done
    for c in 8 16 32; do load "$server" "$pid" image_b8 /predictions/image_b8 "$out/cat640.jpg" image/jpeg "$c"; done
    echo "{\"bench\": \"memory_after_load\", \"server\": \"$server\", \"pss_mb\": $(pss_tree "$pid")}" | tee -a "$results"
    stop_server "$server" "$pid"
    cd "$root"
}

stop_server() {
    if [ "$1" = torchserve ]; then
        "$root/$tsvenv/bin/torchserve" --stop >/dev/null 2>&1 || true
    else
        kill "$2" 2>/dev/null || true
    fi
    wait "$2" 2>/dev/null || true
}
cleanup() { "$root/$tsvenv/bin/torchserve" --stop >/dev/null 2>&1 || true; }
trap cleanup EXIT

# Each server gets the MLP archive made for it, under the same name in the same store.
cp "$work/tch/mlp.mar" "$store/"
run tchserve "$bin/tchserve" --foreground --ncs --ts-config "$home/config.properties" \
    --log-dir "$home/logs" --models mlp=mlp.mar resnet18=resnet18.mar
cp "$work/ts/mlp.mar" "$store/"
# TorchServe's foreground mode keeps the frontend as this shell's child.
run torchserve "$root/$tsvenv/bin/torchserve" --start --foreground --ncs --ts-config "$home/config.properties" \
    --models mlp=mlp.mar resnet18=resnet18.mar

"$tsvenv/bin/python" bench/compare_charts.py "$results" "$work"
