#!/usr/bin/env bash
# Makes an LR-ASPP segmenter and archives it with the built-in image_segmenter handler.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/build/examples/image_segmenter

"$root/.venv/bin/python" "$here/make_model.py" "$out"
"$root/target/release/tch-model-archiver" \
    --model-name segmenter --version 1.0 \
    --serialized-file "$out/segmenter.pt" \
    --handler image_segmenter \
    --export-path "$root/model-store" --force
