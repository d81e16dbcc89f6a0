#!/usr/bin/env bash
# Detects objects in the example photo: [{"<label>": [x1, y1, x2, y2], "score": s}, ...].
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
curl -sf -X POST "${TCHSERVE_URL:-http://127.0.0.1:8080}/predictions/detector" \
    -H 'Content-Type: image/jpeg' --data-binary "@$root/build/examples/object_detector/astronaut.jpg"
echo
