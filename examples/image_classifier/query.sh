#!/usr/bin/env bash
# Classifies a photo with a running tchserve: the five best ImageNet classes with probabilities.
# Usage: query.sh [cat|coffee]  (default cat)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
curl -sf -X POST "${TCHSERVE_URL:-http://127.0.0.1:8080}/predictions/efficientnet_lite0" \
    -H 'Content-Type: image/jpeg' --data-binary "@$root/build/examples/image_classifier/${1:-cat}.jpg"
echo
