#!/usr/bin/env bash
# Makes the pretrained EfficientNet-Lite0 and archives it with the built-in image_classifier
# handler and its ImageNet class names into the model store.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/build/examples/image_classifier

"$root/.venv/bin/python" "$here/make_model.py" "$out"
"$root/target/release/tch-model-archiver" \
    --model-name efficientnet_lite0 --version 1.0 \
    --serialized-file "$out/efficientnet_lite0.pt" \
    --handler image_classifier \
    --extra-files "$out/index_to_name.json" \
    --export-path "$root/model-store" --force
