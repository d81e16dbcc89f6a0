#!/usr/bin/env bash
# Every protocol against one server, in one run: the same models, registrations and load
# generator (bench's loadgen: closed loop, one connection per concurrent client, HTTP/1.1 or
# HTTP/2 gRPC), over loopback. Prints one JSON line per measurement.
# Usage: bench/protocols.sh [seconds per measurement, default 10]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
secs=${1:-10}
bin=$root/target/release
out=$root/build/bench
store=$out/protocols-store
home=$out/protocols-home

cargo build --release --bins >/dev/null 2>&1
cargo build --release -p tchserve-bench --bins >/dev/null 2>&1
.venv/bin/python bench/make_models.py "$out"
rm -rf "$store" "$home"; mkdir -p "$store" "$home"
archive() { "$bin/tch-model-archiver" --model-name "$1" --version 1.0 --serialized-file "$2" --handler "$3" --export-path "$store" --force; }
archive mlp "$out/mlp.pt" bench/mlp_handler.json
archive resnet18 "$out/resnet18.pt" bench/resnet18_handler.json
archive pool "$out/pool.pt" bench/resnet18_handler.json

# The same input for every protocol: TorchServe's JSON, a KServe v1 instance, a v2 JSON body, a
# v2 binary body (JSON header + little-endian bytes, output binary too) and raw bytes for gRPC.
.venv/bin/python - "$out" <<'PY'
import json, sys
import numpy as np
out = sys.argv[1]
mlp = np.array(json.load(open(f"{out}/mlp.json"))["data"], dtype=np.float32)
img = np.fromfile(f"{out}/resnet18.bin", dtype="<f4")
for name, x, shape in (("mlp", mlp, [1, 784]), ("img", img, [1, 3, 224, 224])):
    open(f"{out}/{name}.ts.json", "w").write(json.dumps(x.reshape(shape[1:]).tolist()))
    # TorchServe's route takes big tensors as raw bytes (the .raw file below).
    open(f"{out}/{name}.v1.json", "w").write(json.dumps({"instances": [x.reshape(shape[1:]).tolist()]}))
    v2 = {"inputs": [{"name": "input0", "datatype": "FP32", "shape": shape, "data": x.tolist()}]}
    open(f"{out}/{name}.v2.json", "w").write(json.dumps(v2))
    head = json.dumps({
        "inputs": [{"name": "input0", "datatype": "FP32", "shape": shape,
                    "parameters": {"binary_data_size": x.nbytes}}],
        "outputs": [{"name": "output0", "parameters": {"binary_data": True}}],
    }).encode()
    open(f"{out}/{name}.v2.bin", "wb").write(head + x.astype("<f4").tobytes())
    open(f"{out}/{name}.v2.len", "w").write(str(len(head)))
    open(f"{out}/{name}.raw", "wb").write(x.astype("<f4").tobytes())
PY

echo "{\"machine\": \"$(lscpu | sed -n 's/^Model name: *//p')\", \"cores\": $(nproc), \"seconds_per_run\": $secs}"
cat > "$home/config.properties" <<CFG
model_store=$store
enable_model_api=true
disable_token_authorization=true
CFG
cd "$home"
"$bin/tchserve" --start --ncs --log-dir "$home/logs" >/dev/null
trap '"$bin/tchserve" --stop --log-dir "$home/logs" >/dev/null 2>&1 || true' EXIT
register() { curl -sf -o /dev/null -X POST "localhost:8081/models?url=$1&model_name=$2&initial_workers=1&batch_size=$3&max_batch_delay=$4"; }
register mlp.mar mlp_b1 1 0
register mlp.mar mlp_b8 8 5
register resnet18.mar resnet18_b1 1 0
register pool.mar pool_b1 1 0

pid=$(head -n 1 "$home/logs/tchserve.pid")
# The server's CPU time so far, in microseconds (utime + stime, in clock ticks).
cpu_us() { awk -v hz="$(getconf CLK_TCK)" '{print int(($14 + $15) * 1000000 / hz)}' "/proc/$pid/stat"; }
load() {
    local before after r
    before=$(cpu_us)
    r=$("$bin/loadgen" --duration "$secs" --warmup 2 "$@")
    after=$(cpu_us)
    # Server CPU per request: what the protocol costs the server, whatever the client costs.
    echo "$r" | python3 -c "import json, sys; r = json.load(sys.stdin); n = r['requests'] * ($secs + 2) / $secs
r['server_cpu_us_per_request'] = round(($after - $before) / max(n, 1), 1); print(json.dumps(r))"
}
# One measurement: name, concurrency, model, input name (mlp or img), protocol.
measure() {
    local name=$1 c=$2 model=$3 in=$4 proto=$5 r
    case $proto in
        torchserve) if [ "$in" = img ]; then
                        r=$(load -c "$c" --path "/predictions/$model" --body "$out/$in.raw" \
                            --content-type application/octet-stream)
                    else
                        r=$(load -c "$c" --path "/predictions/$model" --body "$out/$in.ts.json")
                    fi ;;
        kserve_v1) r=$(load -c "$c" --path "/v1/models/$model:predict" --body "$out/$in.v1.json") ;;
        v2_json) r=$(load -c "$c" --path "/v2/models/$model/infer" --body "$out/$in.v2.json") ;;
        v2_binary) r=$(load -c "$c" --path "/v2/models/$model/infer" --body "$out/$in.v2.bin" \
                     --content-type application/octet-stream \
                     --header "Inference-Header-Content-Length: $(cat "$out/$in.v2.len")") ;;
        v2_grpc) local shape=1,784; [ "$in" = img ] && shape=1,3,224,224
                 r=$(load -c "$c" --addr 127.0.0.1:7070 --grpc "$model" --shape "$shape" --body "$out/$in.raw") ;;
    esac
    echo "{\"bench\": \"$name\", \"protocol\": \"$proto\", \"model\": \"$model\", \"result\": $r}"
}
for proto in torchserve kserve_v1 v2_json v2_binary v2_grpc; do measure mlp_c1 1 mlp_b1 mlp $proto; done
for c in 8 64; do
    for proto in torchserve v2_json v2_binary v2_grpc; do measure "mlp_c$c" "$c" mlp_b8 mlp $proto; done
done
# At concurrency 64 the load generator needs as much CPU as the server on 2 cores, and more for
# gRPC than for HTTP/1.1: the pair again, to see the spread.
for proto in v2_grpc torchserve; do measure mlp_c64_again 64 mlp_b8 mlp $proto; done
# A 1x3x224x224 FP32 input: the protocol's cost alone (a model that only averages it), then
# ResNet-18 end to end.
for proto in torchserve v2_json v2_binary v2_grpc; do measure img_pool_c1 1 pool_b1 img $proto; done
for proto in torchserve v2_json v2_binary v2_grpc; do measure img_resnet18_c1 1 resnet18_b1 img $proto; done
for proto in v2_json v2_binary v2_grpc; do measure img_resnet18_c8 8 resnet18_b1 img $proto; done
