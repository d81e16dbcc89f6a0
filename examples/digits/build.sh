#!/usr/bin/env bash
# Trains the digits classifier, exports it to TorchScript and archives it into the model store.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/build/examples/digits

"$root/.venv/bin/python" "$here/make_model.py" "$out"
"$root/target/release/tch-model-archiver" \
    --model-name digits --version 1.0 \
    --serialized-file "$out/digits.pt" \
    --handler "$here/digits_handler.json" \
    --export-path "$root/model-store" --force
