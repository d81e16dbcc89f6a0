#!/usr/bin/env bash
# Segments the example photo and summarises the answer (224 x 224 pixels of [class, score]):
# the share of pixels of each class present, by its Pascal VOC name.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
curl -sf -X POST "${TCHSERVE_URL:-http://127.0.0.1:8080}/predictions/segmenter" \
    -H 'Content-Type: image/png' --data-binary "@$root/build/examples/image_segmenter/coffee.png" |
    "$root/.venv/bin/python" -c '
import collections, json, sys
names = json.load(open(sys.argv[1]))
rows = json.load(sys.stdin)
counts = collections.Counter(int(px[0]) for row in rows for px in row)
total = sum(counts.values())
print(f"{len(rows)} x {len(rows[0])} pixels")
for c, n in counts.most_common():
    print(f"{100 * n / total:5.1f}%  {names[c]}")' "$root/build/examples/image_segmenter/voc_labels.json"
