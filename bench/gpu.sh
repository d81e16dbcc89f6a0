#!/usr/bin/env bash
# ResNet-18 on one GPU, everything over loopback on the GPU machine:
# - the server's RSS and the GPU's memory in use with 1 and 4 workers of the model at batch 1 and
#   8, first;
# - a batch sweep 1..64: the served model (one GPU worker, raw float32 tensors per request, the
#   tensor handler) against the in-process ceiling on the same GPU (upload, forward, answer back
#   in one loop), from batch 8 up also against 2 and 4 such loops at once over the one model and
#   against the forward alone with its input on the GPU, and served with two and four workers;
# - the ceiling at batch 64 with pageable uploads, against the pinned uploads the server uses;
# - the built-in image_classifier at batch 32 (a 640x480 JPEG per request), 1 and 2 workers;
# - the server again with one intra-op thread in all (cpu_threads=1), batch 32: whether the
#   workers' host work gains or loses by spreading over the cores.
# - the server again with two threads launching the model's forwards (gpu_forward_threads=2):
#   its memory and two workers at batch 8 to 64; then with four: its memory and four workers at
#   batch 8 and 16.
# Prints JSON lines, then a table of the sweep.
# With `small`, only the small batches, where launching the forward is the limit: the ceilings
# at batch 8 and 16, the serving path alone at batch 8 (a model that only averages each channel)
# with 1, 2 and 4 workers, two forward threads with their memory, and four forward threads with
# one intra-op thread in all and up to eight workers.
# Usage: bench/gpu.sh [seconds per measurement, default 5] [small]
#   BIN: folder of the tchserve, tch-model-archiver, ceiling and loadgen binaries
#   (default target/release); PY: a Python with torch and torchvision (default .venv/bin/python).
#   BATCHES, BATCHES2, BATCHES4: the batch sizes run with one, two and four workers (default
#   "1 2 4 8 16 32 64", "8 16 32 64", "8 16 32 64"); CLIENT_THREADS: loadgen's threads (default 6).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-5}
part=${2:-all}
bin=${BIN:-$root/target/release}
py=${PY:-$root/.venv/bin/python}
out=build/bench-gpu
store=$out/store
home=$out/home
[ -e /proc/driver/nvidia ] || [ -e /dev/nvidiactl ] || { echo "bench/gpu.sh needs an NVIDIA GPU" >&2; exit 1; }

"$py" bench/make_models.py "$out" >/dev/null
rm -rf "$store" "$home"; mkdir -p "$store" "$home"
"$bin/tch-model-archiver" --model-name resnet18 --version 1.0 --serialized-file "$out/resnet18.pt" \
    --handler bench/resnet18_handler.json --export-path "$store" --force
"$bin/tch-model-archiver" --model-name pool --version 1.0 --serialized-file "$out/pool.pt" \
    --handler bench/resnet18_handler.json --export-path "$store" --force
"$bin/tch-model-archiver" --model-name resnet18_img --version 1.0 --serialized-file "$out/resnet18.pt" \
    --handler image_classifier --export-path "$store" --force

gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -n 1)
echo "{\"machine\": \"$(lscpu | sed -n 's/^Model name: *//p')\", \"cores\": $(nproc), \"gpu\": \"$gpu\", \"seconds_per_run\": $secs}"

# write_config [cpu_threads [gpu_forward_threads]]: intra-op threads shared by the workers, by
# default one per core, and the threads that launch a model's forwards on the GPU (default 1).
write_config() {
    cat > "$root/$home/config.properties" <<CFG
model_store=$root/$store
enable_model_api=true
default_workers_per_model=1
disable_token_authorization=true
# Room for every client's request: TorchServe's default of 100 answers 503 beyond it.
job_queue_size=1000
${1:+cpu_threads=$1}
${2:+gpu_forward_threads=$2}
CFG
}
write_config
threads=all
forward_threads=1
log=$root/$out/results.jsonl
: > "$log"
emit() { echo "$1" | tee -a "$log"; }
ceiling() { "$bin/ceiling" --model "$root/$out/resnet18.pt" --shape 3,224,224 --device cuda --duration "$secs" "$@"; }
# Six client threads: one cannot send 600 KB bodies as fast as the server takes them. Four sent
# at most about 8,000 a second (4.8 GB/s) on a 16-core H100 machine, below the ceiling from
# batch 16 up; whether they were what held it there was not measured.
load() { "$bin/loadgen" --duration "$secs" --warmup 2 --threads "${CLIENT_THREADS:-6}" "$@"; }
# The HTTP status of a request with no body (Python where curl is missing, as on some GPU images).
if command -v curl >/dev/null; then
    status() { curl -s -o /dev/null -w '%{http_code}' -X "$1" "$2"; }
else
    status() {
        "$py" -c 'import sys, urllib.request as r, urllib.error as e
try: print(r.urlopen(r.Request(sys.argv[2], method=sys.argv[1]), timeout=600).status)
except e.HTTPError as x: print(x.code)
except OSError: print(0)' "$1" "$2"
    }
fi
manage() { status "$1" "http://localhost:8081$2"; }
metrics() { "$py" -c 'import sys, urllib.request as r; print(r.urlopen(sys.argv[1]).read().decode())' http://localhost:8082/metrics; }
# What the workers of MODEL did, from the metrics (observed once per request, so the means are
# weighted by requests): the mean batch, the mean time a worker spent on one, and the workers'
# busy time over the warm-up and the measurement (1.0: one worker never idle). A GPU worker's
# batch counts from its start until its answers are written on the worker's answer thread, which
# overlaps the worker's next batch: one worker may show more than 1.0.
workers_json() {
    metrics | "$py" -c 'import json, re, sys
model, secs = sys.argv[1], float(sys.argv[2])
v = {}
for line in sys.stdin:
    m = re.match(r"(tchserve_(?:handler_seconds|batch_size)_(?:sum|count))\{model_name=\"" + model + r"\".*\} (\S+)", line)
    if m:
        v[m.group(1)] = float(m.group(2))
batch = v["tchserve_batch_size_sum"] / v["tchserve_batch_size_count"]
per_batch = v["tchserve_handler_seconds_sum"] / v["tchserve_handler_seconds_count"]
busy = v["tchserve_handler_seconds_sum"] / batch / (secs + 2)
print(json.dumps({"mean_batch": round(batch, 1), "worker_ms_per_batch": round(per_batch * 1000, 2), "worker_busy": round(busy, 2)}))' "$1" "$secs"
}
gpu_mb() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -n 1; }

cd "$home"
start() {
    "$bin/tchserve" --start --ncs --log-dir "$root/$home/logs" >/dev/null
    until [ "$(status GET http://localhost:8080/ping)" = 200 ]; do sleep 0.1; done
    pid=$(head -n 1 logs/tchserve.pid)
}
trap '"$bin/tchserve" --stop >/dev/null 2>&1 || true' EXIT
start

# served BATCH WORKERS: ResNet-18 registered with that batch size and workers on the one GPU,
# under three times as many concurrent clients as the batches hold: a worker has a batch being
# answered and one being prepared, and while the first one's clients send their next requests,
# a third batch's worth waits in the queue for it.
served() {
    local b=$1 n=$2 mar=${3:-resnet18} c=$((3 * $1 * $2 > 4 ? 3 * $1 * $2 : 4)) result
    # A name of its own: the metrics of a name outlive its registration.
    local name=${mar}_b${b}_w$n
    [ "$(manage POST "/models?url=$mar.mar&model_name=$name&initial_workers=$n&batch_size=$b&max_batch_delay=20")" = 200 ]
    result=$(load --path "/predictions/$name" --body "$root/$out/resnet18.bin" --content-type application/octet-stream -c "$c")
    emit "{\"bench\": \"served\", \"model\": \"$mar\", \"batch\": $b, \"workers\": $n, \"cpu_threads\": \"$threads\", \"forward_threads\": $forward_threads, \"result\": $result, \"worker\": $(workers_json "$name")}"
    manage DELETE "/models/$name" >/dev/null
}
# memory: the server's RSS and the GPU's memory in use, with no model, then one and four GPU
# workers of ResNet-18 after load, at batch 1 (what a worker costs beside the batches it holds)
# and then at batch 8 (with a batch of 4.8 MB of input in flight or two per worker). Taken first
# in a fresh server: a later reading would show what libtorch's caches kept from earlier runs,
# not what the workers need.
memory() {
    sleep 1
    emit "{\"bench\": \"memory\", \"forward_threads\": $forward_threads, \"batch\": 0, \"workers\": 0, \"rss_mb\": $(($(awk '/VmRSS/{print $2}' "/proc/$pid/status") / 1024)), \"gpu_mb\": $(gpu_mb)}"
    for b in 1 8; do
        [ "$(manage POST "/models?url=resnet18.mar&model_name=mem$b&initial_workers=1&batch_size=$b&max_batch_delay=20")" = 200 ]
        for n in 1 4; do
            [ "$(manage PUT "/models/mem$b?min_worker=$n&max_worker=$n&synchronous=true")" = 200 ]
            load --path "/predictions/mem$b" --body "$root/$out/resnet18.bin" --content-type application/octet-stream -c $((4 * b)) >/dev/null
            sleep 2
            emit "{\"bench\": \"memory\", \"forward_threads\": $forward_threads, \"batch\": $b, \"workers\": $n, \"rss_mb\": $(($(awk '/VmRSS/{print $2}' "/proc/$pid/status") / 1024)), \"gpu_mb\": $(gpu_mb)}"
        done
        manage DELETE "/models/mem$b" >/dev/null
    done
}
memory

# ceilings BATCH: the in-process ceiling at that batch; from batch 8 up also that of loops
# overlapping each other as workers do, and the forward alone on an input already on the GPU.
ceilings() {
    emit "{\"bench\": \"ceiling\", \"batch\": $1, \"result\": $(ceiling --batch "$1")}"
    if [ "$1" -ge 8 ]; then
        for n in 2 4; do
            emit "{\"bench\": \"ceiling\", \"batch\": $1, \"loops\": $n, \"result\": $(ceiling --batch "$1" --loops "$n")}"
        done
        emit "{\"bench\": \"ceiling_resident\", \"batch\": $1, \"result\": $(ceiling --batch "$1" --resident)}"
    fi
}
# restart [cpu_threads [gpu_forward_threads]]: the server again with that configuration.
restart() {
    "$bin/tchserve" --stop >/dev/null
    write_config "${1:-}" "${2:-}"
    threads=${1:-all}
    forward_threads=${2:-1}
    start
}

if [ "$part" = small ]; then
    for b in 8 16; do ceilings "$b"; done
    for n in 1 2 4; do served 8 "$n" pool; done
    restart "" 2
    memory
    for b in 8 16; do served "$b" 2; done
    restart 1 4
    served 8 2
    for n in 4 8; do served 8 "$n"; done
    served 16 4
fi

if [ "$part" = all ]; then
    for b in ${BATCHES:-1 2 4 8 16 32 64}; do
        ceilings "$b"
        served "$b" 1
    done
    # A worker gathers, decodes and copies in its next batch while its answer thread waits for the
    # GPU and writes the answers of the one before; more workers on the same GPU (sharing the loaded
    # model and its forward thread) overlap their host work with each other's too.
    for b in ${BATCHES2:-8 16 32 64}; do served "$b" 2; done
    for b in ${BATCHES4:-8 16 32 64}; do served "$b" 4; done
    # The same requests to a model that only averages each channel: the serving path alone.
    served 32 1 pool
    emit "{\"bench\": \"ceiling_pageable\", \"batch\": 64, \"result\": $(ceiling --batch 64 --pageable)}"
    emit "{\"bench\": \"ceiling_pinned\", \"batch\": 64, \"result\": $(ceiling --batch 64)}"

    # A worker decodes its batch's JPEGs on the host, then runs the forward: a second worker on the
    # same GPU decodes while the first one's forward runs.
    # The worker's time per batch against worker_cost's decode_us (one core's work per image) tells
    # whether the batch's images were decoded on all the worker's cores.
    for n in 1 2; do
        [ "$(manage POST "/models?url=resnet18_img.mar&model_name=img_w$n&initial_workers=$n&batch_size=32&max_batch_delay=20")" = 200 ]
        result=$(load --path "/predictions/img_w$n" --body "$root/$out/cat640.jpg" --content-type image/jpeg -c 64)
        emit "{\"bench\": \"image_classifier_served\", \"batch\": 32, \"workers\": $n, \"result\": $result, \"worker\": $(workers_json "img_w$n")}"
        manage DELETE "/models/img_w$n" >/dev/null
    done

    # A worker's parallel regions wait for their slowest thread, which the HTTP threads and the
    # clients keep off the cores under load (the batch copy is a plain one for that reason; see
    # bench/src/bin/batch_copy.rs). Whether any that remain cost a GPU worker: one thread in all.
    restart 1
    served 32 1
    served 32 1 pool
    served 32 4

    # Small batches take ResNet-18 as long to launch as to run, and one thread launches a model's
    # forwards on a GPU: two threads launching them, with two workers, then four with four, and
    # what they hold.
    restart "" 2
    memory
    for b in 8 16 32 64; do served "$b" 2; done
    restart "" 4
    memory
    for b in 8 16; do served "$b" 4; done
fi

"$py" - "$log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
# The ceiling of N loops at once, keyed by (batch, N); one loop is the plain ceiling.
ceil = {(r["batch"], r.get("loops", 1)): r["result"]["examples_per_s"] for r in rows if r["bench"] == "ceiling"}
best = {}
for (b, _), v in ceil.items():
    best[b] = max(best.get(b, 0), v)
print("| model | batch | workers | cpu_threads | forward threads | served img/s | / 1 loop | / as many loops | / best ceiling | p50 ms | errors | mean batch | worker ms/batch | workers busy |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if r["bench"] == "served":
        b, n, s, w = r["batch"], r["workers"], r["result"], r["worker"]
        ratio = lambda c: f"{s['rps'] / c:.0%}" if c and r["model"] == "resnet18" else ""
        print(f"| {r['model']} | {b} | {n} | {r.get('cpu_threads', 'all')} | {r.get('forward_threads', 1)} | {s['rps']:.0f} | {ratio(ceil.get((b, 1)))} | {ratio(ceil.get((b, n)))} | {ratio(best.get(b))} | {s['p50_ms']} | {s['errors']} | {w['mean_batch']} | {w['worker_ms_per_batch']} | {w['worker_busy']} |")
print()
print("| batch | ceiling, 1 loop | 2 loops | 4 loops | forward alone (input on the GPU) |")
print("|---|---|---|---|---|")
resident = {r["batch"]: r["result"]["examples_per_s"] for r in rows if r["bench"] == "ceiling_resident"}
for b in sorted({b for b, _ in ceil}):
    print(f"| {b} | {ceil.get((b, 1), '')} | {ceil.get((b, 2), '')} | {ceil.get((b, 4), '')} | {resident.get(b, '')} |")
print()
print("| forward threads | batch | workers | RSS MB | GPU MB |")
print("|---|---|---|---|---|")
for r in rows:
    if r["bench"] == "memory":
        print(f"| {r.get('forward_threads', 1)} | {r.get('batch', 8)} | {r['workers']} | {r['rss_mb']} | {r['gpu_mb']} |")
PY
