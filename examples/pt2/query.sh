#!/usr/bin/env bash
# Classifies a photo with the .pt2 EfficientNet-Lite0 of a running tchserve: the five best
# ImageNet classes with probabilities, as examples/image_classifier/query.sh does with the
# TorchScript one.
# Usage: query.sh [cat|coffee]  (default cat)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
curl -sf -X POST "${TCHSERVE_URL:-http://127.0.0.1:8080}/predictions/efficientnet_lite0_pt2" \
    -H 'Content-Type: image/jpeg' --data-binary "@$root/build/examples/pt2/${1:-cat}.jpg"
echo
