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
deploy/docker/bundle.sh $([ "$cuda" = 1 ] && echo --cuda) build/docker/bundle
"${build[@]}" -f deploy/docker/Dockerfile \
    --build-arg FROM=prebuilt --build-arg BASE_IMAGE="$base" --build-arg CUDA="$cuda" \
    -t "$tag" .
# The image this tag named before, if any, is left untagged: remove it.
docker image prune -f --filter label=org.opencontainers.image.title=tchserve >/dev/null
# So is BuildKit's copy of each bundle it was sent (half a gigabyte a build).
docker builder prune -f >/dev/null 2>&1 || true
echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))"
