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

seeds=$root/fuzz/seeds
mkdir -p "$seeds"/{archive,manifest,handler_manifest,model_config,config_properties,v2_tensor}
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

targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
for t in "${targets[@]}"; do
    echo "fuzz: $t for $minutes min"
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run "$t" "corpus/$t" "$seeds/$t" -- \
        -max_total_time=$((minutes * 60)) -rss_limit_mb=4096 -max_len=1048576 -print_final_stats=1
done
