#!/usr/bin/env bash
# Embeds three sentences with a running tchserve and prints how similar they are.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
"$root/.venv/bin/python" - <<'PY'
import json, os, urllib.request

url = os.environ.get("TCHSERVE_URL", "http://127.0.0.1:8080") + "/predictions/minilm"
sentences = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
vectors = []
for s in sentences:
    req = urllib.request.Request(url, data=s.encode(), headers={"Content-Type": "text/plain"})
    vectors.append(json.load(urllib.request.urlopen(req))["embedding"])
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
print(f"{len(vectors[0])} dimensions")
for i in range(3):
    for j in range(i + 1, 3):
        print(f"{dot(vectors[i], vectors[j]):.3f}  {sentences[i]!r} ~ {sentences[j]!r}")
PY
