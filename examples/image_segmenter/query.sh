#!/usr/bin/env bash
# Segments the example photo and summarises the answer (224 x 224 pixels of [class, score]).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
curl -sf -X POST "${TCHSERVE_URL:-http://127.0.0.1:8080}/predictions/segmenter" \
    -H 'Content-Type: image/png' --data-binary "@$root/build/examples/image_segmenter/coffee.png" |
    "$root/.venv/bin/python" -c '
import json, sys
rows = json.load(sys.stdin)
classes = sorted({int(px[0]) for row in rows for px in row})
print(f"{len(rows)} x {len(rows[0])} pixels; classes present: {classes}")'
