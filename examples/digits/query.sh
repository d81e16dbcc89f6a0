#!/usr/bin/env bash
# Sends held-out digits to a running tchserve (make run) and compares its answers with the labels.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
"$root/.venv/bin/python" - "$root/build/examples/digits/test.json" "${1:-20}" <<'PY'
import json, os, sys, urllib.request

test = json.load(open(sys.argv[1]))
n = int(sys.argv[2])
correct = 0
for pixels, label in list(zip(test["inputs"], test["labels"]))[:n]:
    req = urllib.request.Request(
        os.environ.get("TCHSERVE_URL", "http://127.0.0.1:8080") + "/predictions/digits",
        data=json.dumps({"data": pixels}).encode(),
        headers={"Content-Type": "application/json"},
    )
    logits = json.load(urllib.request.urlopen(req))
    guess = max(range(10), key=lambda i: logits[i])
    correct += guess == label
    print(f"label {label}  predicted {guess}")
print(f"{correct}/{n} correct")
PY
