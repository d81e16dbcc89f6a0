#!/usr/bin/env bash
# Everything a GPU machine is needed for, in one go, with the binaries that
# bench/build-against-torch.sh made for that machine's PyTorch (carried there as
# build/torch-VERSION-bin.tar.xz, the only build output needed):
# - the CUDA tests (tests/gpu.rs, and tests/aoti.rs with its CUDA package);
# - what a GPU worker's batch costs on the host, in process (worker_cost --device cuda): the
#   decoding of the requests, then the batch (pinned copy, upload, forward, answers), for
#   ResNet-18 and for a model that only averages each channel;
# - batch_copy: copying a batch of 32 requests into pinned memory, libtorch's cat against the
#   workers' plain copy, with the cores idle and busy;
# - bench/gpu.sh: the batch sweep against the in-process ceiling, memory per worker.
# Uses the machine's own python3 (with torch and torchvision) for the models and its libtorch.
# Writes its logs under OUT (default build/gpu-check).
# Usage: bench/gpu-check.sh VERSION [seconds per measurement, default 3] [sweep | small]
#   sweep: the CUDA tests and bench/gpu.sh only, without worker_cost and batch_copy;
#   small: `bench/gpu.sh SECONDS small` alone (see there).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
version=${1:?usage: bench/gpu-check.sh VERSION [seconds]}
secs=${2:-3}
only=${3:-}
out=${OUT:-$root/build/gpu-check}
mkdir -p "$out"
stage=$root/build/torch-$version-bin
rm -rf "$stage"; mkdir -p "$stage"
tar -C "$stage" -xJf "build/torch-$version-bin.tar.xz" || exit 1

# The test binaries name the checkout and the binaries by the paths they were built at.
built_at=$(cat "$stage/root")
if [ "$built_at" != "$root" ] && [ ! -e "$built_at" ]; then
    mkdir -p "$(dirname "$built_at")" && ln -s "$root" "$built_at"
fi
# Where the test binaries look for tchserve and the archiver.
bin=$built_at/build/target-torch-$version/release
mkdir -p "$bin"
find "$stage" -maxdepth 1 -type f -exec cp -t "$bin" {} +
py=$(command -v python3)
torch_lib=$("$py" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The TurboJPEG library packed with the binaries, where the machine has none.
ldconfig -p 2>/dev/null | grep -q 'libturbojpeg\.so\.0 ' || LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$stage/lib
# The tests make their models with .venv's Python: here, the machine's. A script, not a link:
# a link would make Python look for its environment beside the link.
if [ ! -e .venv/bin/python ] && [ ! -L .venv/bin/python ]; then
    mkdir -p .venv/bin
    printf '#!/bin/sh\nexec %s "$@"\n' "$py" > .venv/bin/python
    chmod +x .venv/bin/python
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c 'import torch; print("torch", torch.__version__)'; } | tee "$out/machine.txt"

# Of tests/aoti.rs, the CUDA test: the others need the text models .venv brings.
[ "$only" = small ] || for t in "gpu" "aoti cuda"; do
    echo "== tests/$t"
    # shellcheck disable=SC2086
    timeout 300 "$stage"/tests/$t 2>&1 | tee "$out/test-${t%% *}.log" | grep -E "^test |test result|panicked"
done

if [ -z "$only" ]; then
    echo "== worker_cost on the GPU"
    "$py" bench/make_models.py build/bench-gpu >/dev/null
    # One intra-op thread, then one per core as a lone worker in the server has.
    # wide.pt: what writing ResNet-18's 1,000 floats per answer adds to pool.pt, at batch 32.
    for model in resnet18 pool wide; do
        for b in 8 32; do
            [ "$model.$b" = wide.8 ] && continue
            for threads in 1 "$(nproc)"; do
                printf '%s batch %s, %s threads: ' "$model" "$b" "$threads"
                "$bin/worker_cost" --model "build/bench-gpu/$model.pt" --handler bench/resnet18_handler.json \
                    --body build/bench-gpu/resnet18.bin --content-type application/octet-stream \
                    --batch "$b" --device cuda --duration "$secs" --threads "$threads"
            done
        done
    done 2>&1 | tee "$out/worker_cost.txt"
    # A 640x480 JPEG per request: decode_us is one core's decoding and resizing of one image (the
    # server spreads a batch's images over the worker's cores).
    printf 'image_classifier batch 32: '
    "$bin/worker_cost" --model build/bench-gpu/resnet18.pt --handler handlers/image_classifier.json \
        --body build/bench-gpu/cat640.jpg --content-type image/jpeg \
        --batch 32 --device cuda --duration "$secs" --threads "$(nproc)" 2>&1 | tee -a "$out/worker_cost.txt"

    echo "== batch_copy: libtorch's cat against the workers' plain copy, 32 ResNet-18 inputs"
    for busy in 0 "$(nproc)"; do
        timeout 120 "$bin/batch_copy" --threads "$(nproc)" --busy "$busy" --batches 20 --rounds 2
    done 2>&1 | tee "$out/batch_copy.txt"
fi

echo "== bench/gpu.sh"
part=all
[ "$only" = small ] && part=small
BIN=$bin PY=$py timeout 470 bench/gpu.sh "$secs" "$part" 2>&1 | tee "$out/gpu.log" | grep -v '^{'
cp build/bench-gpu/results.jsonl "$out/gpu.jsonl" 2>/dev/null
# The server's own log, for what went wrong if anything did.
tail -c 300000 build/bench-gpu/home/logs/tchserve.log > "$out/server-log-tail.txt" 2>/dev/null
