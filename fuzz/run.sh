#!/usr/bin/env bash
# Runs every fuzz target for MINUTES minutes (default 1), one after the other, from a corpus that
# starts with real inputs: archives made by the real torch-model-archiver and by
# tch-model-archiver in every format, their manifests, the built-in handler manifests, a
# model-config.yaml, a config.properties and v2 tensor data. A crash stops the run and leaves its
# input under fuzz/artifacts/TARGET/.
# Usage: fuzz/run.sh [MINUTES] [TARGET...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"
minutes=${1:-1}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# The image, tensor_input and http_request targets link libtorch; its rpath is set only for the
# project's own binaries.
export LD_LIBRARY_PATH="$root/.libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

seeds=$root/fuzz/seeds
mkdir -p "$seeds"/{archive,manifest,handler_manifest,model_config,config_properties,v2_tensor,image,tensor_input,tensor_inputs,http_request}
if [ ! -e "$seeds/.made" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    printf 'not a model, but small' > "$work/model.pt"
    printf 'minWorkers: 1\nmaxWorkers: 2\nbatchSize: 4\nhandler:\n  top_k: 3\n' > "$work/model-config.yaml"
    cp "$work/model-config.yaml" "$seeds/model_config/basic.yaml"
    for format in default no-archive tgz; do
        "$root/.venv/bin/torch-model-archiver" --model-name "ts_$format" --version 1.0 \
            --serialized-file "$work/model.pt" --handler image_classifier \
            --config-file "$work/model-config.yaml" --archive-format "$format" \
            --export-path "$work" --force
    done
    (cd "$root" && cargo build --release --bin tch-model-archiver >/dev/null 2>&1)
    "$root/target/release/tch-model-archiver" --model-name ours --version 2.0 \
        --serialized-file "$work/model.pt" --handler tensor --export-path "$work" --force
    cp "$work/ts_default.mar" "$seeds/archive/ts_zip.mar"
    cp "$work/ts_tgz.tar.gz" "$seeds/archive/ts.tar.gz"
    cp "$work/ours.mar" "$seeds/archive/ours.mar"
    cp "$work/ts_no-archive/MAR-INF/MANIFEST.json" "$seeds/manifest/torchserve.json"
    cp "$root"/handlers/*.json "$seeds/handler_manifest/"
    cat > "$seeds/config_properties/config.properties" <<'CFG'
inference_address=http://127.0.0.1:8080
management_address=https://0.0.0.0:8081
metrics_address=unix:/tmp/metrics.sock
grpc_inference_port=7070
model_store=/mnt/models/model-store
load_models=all
models={"m": {"1.0": {"minWorkers": 1, "maxWorkers": 4, "batchSize": 8}}}
model_snapshot={"name": "startup.cfg", "modelCount": 1, "models": {"m": {"1.0": {"defaultVersion": true, "marName": "m.mar"}}}}
job_queue_size=100
max_request_size=6553500
token_expiration_min=0.5
enable_envvars_config=true
value=$$HOME$$
CFG
    for dt in 0 3 8 9 11 12; do
        { printf "\\x$(printf '%02x' "$dt")"; printf '[[1, 2.5, -3], [4e3, 0, 1]]'; } > "$seeds/v2_tensor/nested_$dt"
    done
    { printf '\x0d'; printf '["a", "bc"]'; } > "$seeds/v2_tensor/strings"
    touch "$seeds/.made"
fi

# Requests: small images in every format (raw, and base64 in JSON), tensor bodies in JSON and raw
# bytes, and whole HTTP bodies for each protocol. The first bytes of each seed are the target's
# selector bytes (see the target's comment).
if [ ! -e "$seeds/.made-requests" ]; then
    "$root/.venv/bin/python" - "$seeds" <<'PY'
import base64, io, json, struct, sys
from pathlib import Path
from PIL import Image

seeds = Path(sys.argv[1])
img = Image.new("RGB", (24, 16))
for x in range(24):
    for y in range(16):
        img.putpixel((x, y), (x * 10, y * 15, (x * y) % 256))
for fmt in ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]:
    buf = io.BytesIO()
    img.save(buf, fmt)
    (seeds / "image" / f"small.{fmt.lower()}").write_bytes(b"\x00" + buf.getvalue())
    if fmt == "JPEG":
        body = json.dumps({"data": base64.b64encode(buf.getvalue()).decode()}).encode()
        (seeds / "image" / "b64.json").write_bytes(b"\x02" + body)
        (seeds / "image" / "progressive.jpg").write_bytes(b"\x01" + buf.getvalue())

t = seeds / "tensor_input"
(t / "json").write_bytes(bytes([0, 1, 0]) + b"[[1.0, 2.5, -3.0, 4.0]]")
(t / "instances").write_bytes(bytes([0, 2, 0]) + b'{"instances": [[[1, 2], [3, 4]]]}')
raw = struct.pack("<6f", *range(6))
(t / "raw").write_bytes(bytes([0, 3, 10]) + b"float32|2,3" + raw)
(t / "raw_i64").write_bytes(bytes([4, 1, 11]) + b"int64|1,2" + struct.pack("<2q", 7, -7))

h = seeds / "http_request"
none = b"\xff\xff"
v2 = {"id": "a", "inputs": [{"name": "input0", "shape": [1, 4], "datatype": "FP32",
                              "data": [1, 2, 3, 4]}], "outputs": [{"name": "output0"}]}
(h / "v2_json").write_bytes(bytes([0, 0]) + none + json.dumps(v2).encode())
head = json.dumps({"inputs": [{"name": "input0", "shape": [1, 4], "datatype": "FP32",
                               "parameters": {"binary_data_size": 16}}],
                   "outputs": [{"name": "output0", "parameters": {"binary_data": True}}]}).encode()
(h / "v2_binary").write_bytes(bytes([0, 1]) + struct.pack("<H", len(head)) + head
                              + struct.pack("<4f", 1, 2, 3, 4))
v2b = {"inputs": [{"name": "input0", "shape": [2], "datatype": "BYTES", "data": ["x", "yz"]}]}
(h / "v2_bytes").write_bytes(bytes([1, 0]) + none + json.dumps(v2b).encode())
(h / "v1").write_bytes(bytes([2, 0]) + none + b'{"instances": [[1, 2, 3, 4], {"b64": "AAE="}]}')
form = (b"--XyZ\r\nContent-Disposition: form-data; name=\"data\"; filename=\"a.bin\"\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n[1, 2, 3, 4]\r\n"
        b"--XyZ\r\nContent-Disposition: form-data; name=\"extra\"\r\n\r\nvalue\r\n--XyZ--\r\n")
(h / "multipart").write_bytes(bytes([3, 2]) + none + form)
(h / "form").write_bytes(bytes([4, 3]) + none + b"data=%5B1%2C2%5D&x=y")
(h / "raw").write_bytes(bytes([3, 1]) + none + b"[1, 2, 3, 4]")
(h / "index").write_bytes(bytes([5, 0]) + none + b'{"ready": true}')
PY
    touch "$seeds/.made-requests"
fi

# Named inputs (tensor_inputs): a JSON object of the names, instances of such objects, and one
# field per input, JSON and raw (see the target's comment for the selector bytes).
if [ ! -e "$seeds/tensor_inputs/object" ]; then
    t=$seeds/tensor_inputs
    printf '\x05\x00\x00\x00\x00{"ids": [1, 2, 3], "dense": [0.5, 0.25]}' > "$t/object"
    printf '\x05\x00\x00\x00\x00{"instances": [{"ids": [1, 2, 3], "dense": [0.5, 0.25]}]}' > "$t/instances"
    printf '\x05\x01\x00\x09\x00[1, 2, 3][0.5, 0.25]' > "$t/fields_json"
    # ids as JSON, dense as raw float32 bytes of shape 1,2.
    { printf '\x05\x01\x03\x09\x03'; printf '1,2[1, 2, 3]'; printf '\x00\x00\x00\x3f\x00\x00\x80\x3e'; } > "$t/fields_raw"
fi

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
for t in "${targets[@]}"; do
    echo "fuzz: $t for $minutes min"
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run "$t" "corpus/$t" "$seeds/$t" -- \
        -max_total_time=$((minutes * 60)) -rss_limit_mb=4096 -max_len=1048576 -print_final_stats=1
done
