#!/usr/bin/env bash
# Builds the container image from this checkout's own build (make build), which takes seconds
# rather than the source build's many minutes:
#
#   deploy/docker/build.sh [--cuda] [--tag NAME] [--base-image IMAGE]
#
# Needs Docker with BuildKit (docker buildx, or Docker 20.10's own client with
# DOCKER_BUILDKIT=1, which this script sets).
set -euo pipefail
cd "$(dirname "$0")/../.."

cuda=0 tag= base=debian:bookworm-slim
while [ $# -gt 0 ]; do
    case $1 in
        --cuda) cuda=1 ;;
        --tag) tag=$2; shift ;;
        --base-image) base=$2; shift ;;
        *) echo "usage: $0 [--cuda] [--tag NAME] [--base-image IMAGE]" >&2; exit 2 ;;
    esac
    shift
done
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
if [ -z "$tag" ]; then
    tag=tchserve/tchserve:$version-$([ "$cuda" = 1 ] && echo gpu || echo cpu)
fi
# BuildKit builds only the stages the image needs (not the source stage).
if docker buildx version >/dev/null 2>&1; then
    build=(docker buildx build --load)
else
    # Docker 20.10's own client runs BuildKit without buildx; later clients need buildx.
    build=()
    for d in $(type -ap docker); do
        case $("$d" version --format '{{.Client.Version}}' 2>/dev/null) in
            19.* | 20.*) build=(env DOCKER_BUILDKIT=1 "$d" build); break ;;
        esac
    done
    [ ${#build[@]} -gt 0 ] || { echo "build: needs docker buildx (or Docker 20.10's client)" >&2; exit 1; }
fi
# The build context is a folder of its own holding only what the prebuilt stage copies, so
# that neither the checkout nor an old bundle is sent to the builder.
context=build/docker/context
rm -rf build/docker/bundle "$context"
mkdir -p "$context/build/docker" "$context/deploy"
deploy/docker/bundle.sh $([ "$cuda" = 1 ] && echo --cuda) "$context/build/docker/bundle"
cp -r deploy/docker "$context/deploy/docker"
"${build[@]}" -f deploy/docker/Dockerfile \
    --build-arg FROM=prebuilt --build-arg BASE_IMAGE="$base" --build-arg CUDA="$cuda" \
    -t "$tag" "$context"
rm -rf "$context"
# The image this tag named before, if any, is left untagged: remove it.
docker image prune -f --filter label=org.opencontainers.image.title=tchserve >/dev/null
# So is BuildKit's copy of the context it was sent (half a gigabyte a build); other cached
# layers stay.
docker builder prune -f --filter type=source.local >/dev/null 2>&1 || true
# Binaries built against a newer C library than the base image's would fail only at run time.
if ! out=$(docker run --rm --entrypoint tchserve "$tag" --version 2>&1); then
    echo "build: the image's tchserve does not run on $base:" >&2
    echo "$out" >&2
    exit 1
fi
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
