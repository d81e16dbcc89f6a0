#!/usr/bin/env bash
# Makes ResNet-18 and archives it with the built-in image_classifier handler into the model store.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/build/examples/image_classifier

"$root/.venv/bin/python" "$here/make_model.py" "$out"
"$root/target/release/tch-model-archiver" \
    --model-name resnet18 --version 1.0 \
    --serialized-file "$out/resnet18.pt" \
    --handler image_classifier \
    --extra-files "$out/index_to_name.json" \
    --export-path "$root/model-store" --force
