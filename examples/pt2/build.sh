#!/usr/bin/env bash
# Makes the digits classifier and the pretrained EfficientNet-Lite0 as .pt2 packages and
# archives them, with the same handlers as their TorchScript examples, into the model store.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/build/examples/pt2

"$root/.venv/bin/python" "$here/make_model.py" "$out"
"$root/target/release/tch-model-archiver" \
    --model-name digits_pt2 --version 1.0 \
    --serialized-file "$out/digits.pt2" \
    --handler "$root/examples/digits/digits_handler.json" \
    --export-path "$root/model-store" --force
"$root/target/release/tch-model-archiver" \
    --model-name efficientnet_lite0_pt2 --version 1.0 \
    --serialized-file "$out/efficientnet_lite0.pt2" \
    --handler image_classifier \
    --extra-files "$out/index_to_name.json" \
    --export-path "$root/model-store" --force
