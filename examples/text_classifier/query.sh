#!/usr/bin/env bash
# Classifies a sentence with a running tchserve: every label with its probability, best first.
set -euo pipefail
curl -sf -X POST "${TCHSERVE_URL:-http://127.0.0.1:8080}/predictions/sentiment" \
    -H 'Content-Type: text/plain' --data-binary "${1:-This server answers quickly.}"
echo
