#!/usr/bin/env bash
# Memory per worker, tchserve beside TorchServe 0.12.0: the pretrained-shape ResNet-18 (47 MB of
# weights) archived once by the real torch-model-archiver with the built-in image_classifier
# handler, served by each server in turn, scaled to 1, 4 and 16 CPU workers. After each scale,
# 3 s of load at concurrency 16 (a 640x480 JPEG) so that every worker runs forwards, then 3 s of
# rest; the memory of the server and all its processes (proportional set size) is measured
# 2.5 s into the load and after the rest. Prints JSON lines and the MB each worker beyond the
# first costs, under load and at rest.
# TorchServe is installed on first use in build/torchserve-venv (see bench/torchserve/common.sh).
# Usage: bench/workers_memory.sh [tchserve|torchserve|both]   (BIN=... for another tchserve)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# BIN may be relative to where the script was started.
bin=$(realpath "${BIN:-$root/target/release/tchserve}")
cd "$root"
which=${1:-both}
out=build/bench
store=$out/workers-store
home=$out/workers-home
tsvenv=build/torchserve-venv

cargo build --release -p tchserve-bench --bins >/dev/null 2>&1
[ -f "$out/resnet18.pt" ] || .venv/bin/python bench/make_models.py "$out"
rm -rf "$store" "$home"; mkdir -p "$store" "$home"
.venv/bin/torch-model-archiver --model-name resnet18 --version 1.0 --serialized-file "$out/resnet18.pt" \
    --handler image_classifier --export-path "$store" --force
. bench/torchserve/common.sh
[ "$which" = tchserve ] || ensure_torchserve
cat > "$home/config.properties" <<CFG
model_store=$root/$store
default_workers_per_model=1
CFG

measure() {
    local server=$1 pid=$2 first= first_busy= n mb per busy per_busy load
    until curl -s -o /dev/null -w '%{http_code}' localhost:8080/ping | grep -q 200; do
        kill -0 "$pid" 2>/dev/null || { echo "$server exited before answering: see $home" >&2; exit 1; }
        sleep 0.2
    done
    curl -s -o /dev/null -X POST "localhost:8081/models?url=resnet18.mar&initial_workers=1&synchronous=true"
    for n in 1 4 16; do
        curl -s -o /dev/null -X PUT "localhost:8081/models/resnet18?min_worker=$n&max_worker=$n&synchronous=true"
        "$root/target/release/loadgen" --duration 3 --warmup 0 --path /predictions/resnet18 \
            --body "$root/$out/cat640.jpg" --content-type image/jpeg -c 16 >/dev/null &
        load=$!
        # Once under load, with every worker's buffers in use, and once at rest: idle workers
        # may hand memory back (tchserve's do after 1 s).
        sleep 2.5
        busy=$(pss_tree "$pid")
        wait "$load"
        sleep 3
        mb=$(pss_tree "$pid")
        first=${first:-$mb}
        first_busy=${first_busy:-$busy}
        per=$([ "$n" -gt 1 ] && echo "scale=1; ($mb - $first) / ($n - 1)" | bc | sed "s/^\./0./; s/^-\./-0./" || echo 0)
        per_busy=$([ "$n" -gt 1 ] && echo "scale=1; ($busy - $first_busy) / ($n - 1)" | bc | sed "s/^\./0./; s/^-\./-0./" || echo 0)
        echo "{\"bench\": \"resnet18_workers\", \"server\": \"$server\", \"workers\": $n, \"pss_mb\": $mb, \"mb_per_extra_worker\": $per, \"pss_mb_under_load\": $busy, \"mb_per_extra_worker_under_load\": $per_busy}"
    done
}

cd "$home"
pid=
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
    [ "$which" = tchserve ] || "$root/$tsvenv/bin/torchserve" --stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
if [ "$which" != torchserve ]; then
    "$bin" --foreground --ncs --disable-token-auth --enable-model-api --log-dir "$root/$home/logs" \
        >"$root/$home/tchserve.log" 2>&1 &
    pid=$!
    measure tchserve "$pid"
    kill "$pid"; wait "$pid" || true
    pid=
fi
if [ "$which" != tchserve ]; then
    # TorchServe's own foreground mode keeps the frontend as this shell's child.
    "$root/$tsvenv/bin/torchserve" --start --foreground --ncs --disable-token-auth --enable-model-api \
        --ts-config config.properties >"$root/$home/torchserve.log" 2>&1 &
    pid=$!
    measure torchserve "$pid"
    "$root/$tsvenv/bin/torchserve" --stop >/dev/null 2>&1 || true
    wait "$pid" 2>/dev/null || true
fi
