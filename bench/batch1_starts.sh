#!/usr/bin/env bash
# ResNet-18 at batch size 1, concurrency 1, over many server starts: how often its worker runs
# in the slow state described in docs/benchmarks.md ("A later run, and a slow state that comes
# and goes"). Each start is set up as bench/compare-torchserve.sh sets up tchserve: the MLP and
# ResNet-18 (image_classifier) loaded at start-up, ResNet-18 answering once, `image_b1` and
# `mlp_b1` registered with one worker each, 3 s of the MLP at concurrency 16, then 2 s of
# warm-up and the measured seconds of `image_b1` with `wrk -t1 -c1`.
# Prints a JSON line per start: requests/s, the worker's mean time per request (metrics), and
# for each of the worker's threads (itself and its OpenMP team) the CPU seconds it ran and the
# times it went to sleep during the measurement.
# Usage: bench/batch1_starts.sh [starts, default 10] [seconds per measurement, default 4]
# TCHSERVE="PATH..." alternates several builds of the server (absolute paths), start by start;
# the word `torchserve` among them is TorchServe 0.12.0 set up the same way (installed as
# bench/compare-torchserve.sh installs it), for which only requests/s are printed.
# ALONE=1 serves image_b1 alone instead: no other model, no MLP load.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
starts=${1:-10}
secs=${2:-4}
bin=target/release
out=build/bench
store=$out/starts-store
ts_store=$out/starts-ts-store
home=$out/starts-home
tsvenv=build/torchserve-venv

command -v wrk >/dev/null || apt-get install -y -q wrk >/dev/null
cargo build --release -p tchserve-cli --bins >/dev/null 2>&1
[ -f "$out/resnet18.pt" ] && [ -f "$out/mlp.json" ] || .venv/bin/python bench/make_models.py "$out" >/dev/null
rm -rf "$store" "$home"; mkdir -p "$store" "$home"
"$bin/tch-model-archiver" --model-name mlp --version 1.0 --serialized-file "$out/mlp.pt" \
    --handler bench/mlp_handler.json --export-path "$store" --force
"$bin/tch-model-archiver" --model-name resnet18 --version 1.0 --serialized-file "$out/resnet18.pt" \
    --handler image_classifier --export-path "$store" --force
read -r -a builds <<< "${TCHSERVE:-$root/$bin/tchserve}"
if [[ " ${builds[*]} " == *" torchserve "* ]]; then
    . bench/torchserve/common.sh
    ensure_torchserve
    rm -rf "$ts_store"; mkdir -p "$ts_store"
    # Each server's own archiver; TorchServe has no built-in handler for the MLP's JSON tensor.
    "$tsvenv/bin/torch-model-archiver" --model-name mlp --version 1.0 --serialized-file "$out/mlp.pt" \
        --handler bench/torchserve/mlp_handler.py --export-path "$ts_store"
    "$tsvenv/bin/torch-model-archiver" --model-name resnet18 --version 1.0 --serialized-file "$out/resnet18.pt" \
        --handler image_classifier --export-path "$ts_store"
fi
# config STORE: the one config.properties both servers read, with its model store.
config() {
    cat > "$root/$home/config.properties" <<CFG
inference_address=http://127.0.0.1:8080
management_address=http://127.0.0.1:8081
metrics_address=http://127.0.0.1:8082
model_store=$root/$1
default_workers_per_model=1
disable_token_authorization=true
enable_model_api=true
CFG
}

post() { BODY=$1 CTYPE=$2 wrk -t1 -c"$3" -d"$4"s -s "$root/bench/wrk_post.lua" "http://127.0.0.1:8080/predictions/$5"; }
register() {
    curl -s -o /dev/null -X POST \
        "127.0.0.1:8081/models?url=$1&model_name=$2&batch_size=1&max_batch_delay=0&initial_workers=1&synchronous=true"
}
# CPU seconds and voluntary switches of each thread of image_b1's worker (they carry its name).
threads() {
    for t in /proc/"$1"/task/*; do
        case $(cat "$t/comm") in
            *image_b1*) awk -v tid="${t##*/}" '/^se.sum_exec_runtime/ { ms = $3 } /^nr_voluntary_switches/ { v = $3 }
                END { printf "%s %.3f %d\n", tid, ms / 1000, v }' "$t/sched" ;;
        esac
    done
}
# The worker's total handler seconds and requests so far.
handled() {
    python3 -c 'import re, urllib.request as r
v = {}
for line in r.urlopen("http://127.0.0.1:8082/metrics").read().decode().splitlines():
    m = re.match(r"tchserve_handler_seconds_(sum|count)\{model_name=\"image_b1\".*\} (\S+)", line)
    if m:
        v[m.group(1)] = float(m.group(2))
print(v["sum"], v["count"])'
}

cd "$home"
for i in $(seq 1 "$starts"); do
    for server in "${builds[@]}"; do
        if [ -n "${ALONE:-}" ]; then models=(); else models=(--models mlp=mlp.mar resnet18=resnet18.mar); fi
        if [ "$server" = torchserve ]; then
            config "$ts_store"
            # Foreground mode keeps TorchServe's frontend as this shell's child.
            "$root/$tsvenv/bin/torchserve" --start --foreground --ncs --ts-config config.properties \
                "${models[@]}" > server.log 2>&1 &
        else
            config "$store"
            "$server" --foreground --ncs --ts-config config.properties --log-dir logs "${models[@]}" \
                > server.log 2>&1 &
        fi
        pid=$!
        # Ready once it answers: ResNet-18 answers once, as in the head-to-head's timing.
        if [ -n "${ALONE:-}" ]; then ready=(127.0.0.1:8080/ping); else
            ready=(-X POST 127.0.0.1:8080/predictions/resnet18 -H 'Content-Type: image/jpeg'
                --data-binary "@$root/$out/cat640.jpg"); fi
        until [ "$(curl -s -o /dev/null -w '%{http_code}' "${ready[@]}" 2>/dev/null)" = 200 ]; do
            kill -0 "$pid" 2>/dev/null || { echo "the server exited; see $home/server.log" >&2; exit 1; }
            sleep 0.1
        done
        register resnet18.mar image_b1
        if [ -z "${ALONE:-}" ]; then
            register mlp.mar mlp_b1
            post "$root/$out/mlp.json" application/json 16 3 mlp_b1 >/dev/null
        fi
        post "$root/$out/cat640.jpg" image/jpeg 1 2 image_b1 >/dev/null
        measure() { post "$root/$out/cat640.jpg" image/jpeg 1 "$secs" image_b1 | awk '/Requests\/sec/ { print $2 }'; }
        if [ "$server" = torchserve ]; then
            echo "{\"start\": $i, \"server\": \"torchserve\", \"rps\": $(measure)}"
            "$root/$tsvenv/bin/torchserve" --stop >/dev/null 2>&1 || true
            wait "$pid" 2>/dev/null || true
            continue
        fi
        before=$(threads "$pid"); read -r s0 n0 <<< "$(handled)"
        rps=$(measure)
        after=$(threads "$pid"); read -r s1 n1 <<< "$(handled)"
        per_thread=$(join <(echo "$before" | sort) <(echo "$after" | sort) \
            | awk '{ printf "%s{\"cpu_s\": %.2f, \"sleeps\": %d}", (NR > 1 ? ", " : ""), $4 - $2, $5 - $3 }')
        echo "{\"start\": $i, \"server\": \"$server\", \"rps\": $rps, \"worker_ms\": $(awk -v a="$s0" -v b="$s1" -v m="$n0" -v n="$n1" 'BEGIN { printf "%.2f", 1000 * (b - a) / (n - m) }'), \"threads\": [$per_thread]}"
        kill "$pid"; wait "$pid" 2>/dev/null || true
    done
done
