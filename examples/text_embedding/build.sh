#!/usr/bin/env bash
# Exports all-MiniLM-L6-v2 and archives it with the built-in text_embedding handler.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/build/examples/text_embedding

"$root/.venv/bin/python" "$here/make_model.py" "$out" 2>/dev/null
"$root/target/release/tch-model-archiver" \
    --model-name minilm --version 1.0 \
    --serialized-file "$out/minilm.pt" \
    --handler text_embedding \
    --extra-files "$out/tokenizer.json" \
    --export-path "$root/model-store" --force
