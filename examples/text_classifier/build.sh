#!/usr/bin/env bash
# Exports the MiniLM classifier and archives it with the built-in text_classifier handler.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$root/build/examples/text_classifier

"$root/.venv/bin/python" "$here/make_model.py" "$out" 2>/dev/null
"$root/target/release/tch-model-archiver" \
    --model-name sentiment --version 1.0 \
    --serialized-file "$out/sentiment.pt" \
    --handler text_classifier \
    --extra-files "$out/tokenizer.json,$out/index_to_name.json" \
    --export-path "$root/model-store" --force
