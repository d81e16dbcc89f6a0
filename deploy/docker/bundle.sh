#!/usr/bin/env bash
# Gathers what the container image needs into one folder: the two binaries and the shared
# libraries they load (libtorch's and libjpeg-turbo's), not the rest of the PyTorch wheel.
#
#   deploy/docker/bundle.sh [--cuda] OUT
#
# --cuda adds libtorch's CUDA half, which tchserve opens at run time where a GPU is present,
# with the CUDA libraries it needs, including the ones libtorch opens lazily (cuDNN's engines,
# NVRTC). The C library and libstdc++ are left to the base image: every Debian has them.
set -euo pipefail
cd "$(dirname "$0")/../.."

cuda=0
if [ "${1:-}" = --cuda ]; then cuda=1; shift; fi
out=${1:?usage: bundle.sh [--cuda] OUT}
bin=${BIN_DIR:-target/release}
libtorch=$(readlink -f "${LIBTORCH_DIR:-.libtorch}")/lib

for b in tchserve tch-model-archiver; do
    [ -x "$bin/$b" ] || { echo "bundle: $bin/$b is missing: build first (make build)" >&2; exit 1; }
done
[ -e "$libtorch/libtorch_cpu.so" ] || { echo "bundle: no libtorch in $libtorch (run scripts/setup.sh)" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
cp "$bin/tchserve" "$bin/tch-model-archiver" "$out/bin/"
# Line tables are most of a release binary (140 MB of tchserve's 165); function names stay, so
# a backtrace still says where.
strip --strip-debug "$out/bin/tchserve" "$out/bin/tch-model-archiver"

# What the base image provides: glibc's libraries, the dynamic loader, and GCC's runtime.
provided='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libutil|libresolv|libstdc\+\+|libgcc_s)\.so'

roots=("$bin/tchserve" "$bin/tch-model-archiver")
if [ "$cuda" = 1 ]; then
    nvidia=$(readlink -f "$libtorch/../../nvidia")
    roots+=("$libtorch/libtorch_cuda.so" "$libtorch/libc10_cuda.so")
    [ -e "$libtorch/libtorch_cuda_linalg.so" ] && roots+=("$libtorch/libtorch_cuda_linalg.so")
    # Opened with dlopen, so no NEEDED entry leads to them.
    for f in "$nvidia"/cudnn/lib/libcudnn*.so* "$nvidia"/*/lib/libnvrtc*.so* \
             "$nvidia"/*/lib/libnvJitLink.so* "$nvidia"/*/lib/libcublasLt.so*; do
        [ -e "$f" ] && roots+=("$f")
    done
fi

declare -A seen=()
copy() {
    local path=$1 name
    name=$(basename "$path")
    [ -n "${seen[$name]:-}" ] && return
    seen[$name]=1
    cp -L "$path" "$out/lib/$name"
}
for r in "${roots[@]}"; do
    case $r in "$bin"/*) ;; *) copy "$r" ;; esac
    # ldd resolves through each library's own RPATH, as the loader will.
    while read -r name _ path _; do
        [ -n "$path" ] && [ -e "$path" ] || continue
        [[ $name =~ $provided ]] && continue
        copy "$path"
    done < <(ldd "$r" | grep '=> /')
done

# A .pt2 package's compiled code is linked against libtorch.so, which no binary here needs. The
# wheel's libtorch.so is only a front for libtorch_cpu.so and libtorch_cuda.so, so the CUDA image
# takes it as it is, and the CPU image a front of the same name for libtorch_cpu.so alone, which
# keeps libtorch's CUDA half out of it.
if [ "$cuda" = 1 ]; then
    copy "$libtorch/libtorch.so"
else
    cc -shared -x c /dev/null -o "$out/lib/libtorch.so" -Wl,-soname,libtorch.so \
        -Wl,-rpath,'$ORIGIN' -Wl,--no-as-needed -L"$out/lib" -l:libtorch_cpu.so -l:libc10.so
    roots+=("$out/lib/libtorch.so")
fi

unresolved=$(for r in "${roots[@]}"; do ldd "$r" | grep 'not found' || true; done | sort -u)
if [ -n "$unresolved" ]; then
    echo "bundle: unresolved libraries:" >&2
    echo "$unresolved" >&2
    exit 1
fi
echo "bundle: $(ls "$out/lib" | wc -l) libraries, $(du -sh "$out" | cut -f1) in $out"
