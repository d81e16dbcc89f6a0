#!/usr/bin/env bash
# Classifies the example photo with a running tchserve: the five best labels with probabilities.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
curl -sf -X POST "${TCHSERVE_URL:-http://127.0.0.1:8080}/predictions/resnet18" \
    -H 'Content-Type: image/jpeg' --data-binary "@$root/build/examples/image_classifier/cat.jpg"
echo
