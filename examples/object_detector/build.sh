#!/usr/bin/env bash
# Makes a Faster R-CNN detector and archives it with the built-in object_detector handler.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/build/examples/object_detector

"$root/.venv/bin/python" "$here/make_model.py" "$out" 2>/dev/null
"$root/target/release/tch-model-archiver" \
    --model-name detector --version 1.0 \
    --serialized-file "$out/detector.pt" \
    --handler object_detector \
    --extra-files "$out/index_to_name.json" \
    --export-path "$root/model-store" --force
