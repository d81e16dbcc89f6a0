#!/usr/bin/env bash
# Builds tchserve's binaries against another PyTorch release's libtorch, for a machine whose
# PyTorch is not the 2.13.0 tchserve links (a GPU machine with its own CUDA build of PyTorch, say)
# and where bringing a second libtorch is not an option. The binaries then load that machine's
# libtorch (LD_LIBRARY_PATH=<its torch>/lib); the code is this checkout's.
#
# tch's bindings are generated for 2.13.0: the operators an older libtorch lacks are left out
# of a copy of torch-sys (tchserve calls none of them), and tch's version check is bypassed.
# Steps, each skipped when its output is there:
# - the PyTorch wheel of that version from PyPI (no dependencies; only its headers and libraries
#   are used), unpacked into build/torch-VERSION;
# - a copy of torch-sys in build/torch-sys-VERSION without the operators that fail to compile;
# - cargo build --release of every binary, and of the test binaries (cargo test --no-run), into
#   build/target-torch-VERSION, linked against the CUDA libraries of .venv;
# - stripped copies of the binaries, packed as build/torch-VERSION-bin.tar.xz (tens of MB where
#   the binaries are hundreds) with a list of which test binary is which, and the TurboJPEG
#   library they link.
# Usage: bench/build-against-torch.sh VERSION   (e.g. 2.11.0)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
version=${1:?usage: bench/build-against-torch.sh VERSION}
torch=$root/build/torch-$version
sys=$root/build/torch-sys-$version
target=$root/build/target-torch-$version
pack=$root/build/torch-$version-bin.tar.xz

if [ ! -e "$torch/torch/lib/libtorch_cpu.so" ]; then
    mkdir -p "$torch"
    .venv/bin/python -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
        -d "$torch" "torch==$version"
    (cd "$torch" && unzip -q -o torch-*.whl 'torch/include/*' 'torch/lib/*' 'torch/share/*' \
        && rm torch-*.whl)
fi

if [ ! -e "$sys/patched" ]; then
    src=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 1 -mindepth 1 -type d \
        -exec test -d '{}/torch-sys-0.26.0' ';' -print -quit)/torch-sys-0.26.0
    rm -rf "$sys"; cp -r "$src" "$sys"
    gen=$sys/libtch/torch_api_generated.cpp
    # The compiler names each line that does not build; the generated function holding it goes.
    g++ -std=c++17 -fsyntax-only -w -I"$torch/torch/include" \
        -I"$torch/torch/include/torch/csrc/api/include" "$gen" 2>"$sys/errors.txt" || true
    .venv/bin/python - "$gen" "$sys/errors.txt" <<'PY'
import re, sys
gen, errors = sys.argv[1], sys.argv[2]
lines = open(gen).read().split("\n")
bad = {int(m.group(1)) for m in re.finditer(r"torch_api_generated\.cpp:(\d+):\d+: error", open(errors).read())}
drop, names = set(), []
for n in sorted(bad):
    start = n - 1
    while not re.match(r"^\w.*\(", lines[start]):
        start -= 1
    end = n - 1
    while lines[end] != "}":
        end += 1
    drop.update(range(start, end + 1))
    names.append(re.search(r"(atg_\w+)\(", lines[start]).group(1))
open(gen, "w").write("\n".join(l for i, l in enumerate(lines) if i not in drop))
print(f"left out of torch-sys: {len(set(names))} functions: {' '.join(sorted(set(names)))}")
PY
    touch "$sys/patched"
fi

# libtorch_cpu.so needs the CUDA runtime libraries at link time; .venv's PyTorch brought them.
link_path=$(find "$root/.venv/lib" -path '*/nvidia/*/lib' -type d | paste -sd: -)
export LIBTORCH=$torch/torch LIBTORCH_BYPASS_VERSION_CHECK=1 CARGO_TARGET_DIR=$target
export RUSTFLAGS="-C link-arg=-Wl,-rpath-link,$link_path"
patch=(--config "patch.crates-io.torch-sys.path=\"$sys\"")
# The patch would be written into Cargo.lock; the checkout's stays as it is.
cp Cargo.lock "$target.Cargo.lock"
trap 'mv "$target.Cargo.lock" Cargo.lock' EXIT
cargo build --release --workspace --bins "${patch[@]}"
cargo test --release --workspace --no-run "${patch[@]}" 2>&1 | tee "$target/tests.txt" | grep -v "^ *Compiling" || true

# Stripped binaries and test binaries, the latter named by their source file.
stage=$target/stripped
rm -rf "$stage"; mkdir -p "$stage/tests"
for b in "$target"/release/*; do
    [ -f "$b" ] && [ -x "$b" ] && strip -o "$stage/$(basename "$b")" "$b"
done
sed -n 's/^ *Executable \([^ ]*\.rs\) (.*\/deps\/\([^)]*\))$/\1 \2/p' "$target/tests.txt" |
    while read -r source file; do
        strip -o "$stage/tests/$(basename "$source" .rs)" "$target/release/deps/$file"
    done
# TurboJPEG is not on every GPU machine (the H200 image lacks it): this machine's copy goes
# along, and bench/gpu-check.sh uses it where the machine has none of its own.
mkdir -p "$stage/lib"
ldd "$target/release/tchserve" | awk '/libturbojpeg/ {print $3}' | xargs -r cp -L -t "$stage/lib"
# Where the test binaries expect the checkout and the binaries (bench/gpu-check.sh links it).
echo "$root" > "$stage/root"
tar -C "$stage" -cJf "$pack" .
echo "$pack: $(du -h "$pack" | cut -f1) ($(find "$stage" -type f | wc -l) files)"
