#!/usr/bin/env bash
# Installs what building and testing tchserve need, skipping whatever is already in place:
# a C++ compiler, libjpeg-turbo's TurboJPEG library, a Python virtual environment in .venv with
# scripts/requirements.txt, another in .venv-clients with the protocol clients of
# scripts/requirements-clients.txt, and the .libtorch link that .cargo/config.toml points the
# build at.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
REQUIREMENTS=scripts/requirements.txt
CLIENTS_VENV=.venv-clients
CLIENTS_REQUIREMENTS=scripts/requirements-clients.txt

say() { printf 'setup: %s\n' "$*"; }

apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing Debian packages: $*"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null \
            || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
    else
        say "missing: $* (install them with your package manager)"; exit 1
    fi
}

command -v cargo >/dev/null || { say "cargo not found: install Rust 1.89 or newer (https://rustup.rs)"; exit 1; }
command -v c++ >/dev/null || apt_install g++
# libjpeg-turbo's TurboJPEG library: JPEGs are decoded as PIL decodes them.
[ -e /usr/include/turbojpeg.h ] || apt_install libturbojpeg0-dev
command -v "$PYTHON" >/dev/null || apt_install python3 python3-venv

# warn_if_short DIR GB WHY: says so when the disk holding DIR has less than GB gigabytes free.
warn_if_short() {
    local free_gb=$(( $(df -Pk "$1" | awk 'NR==2 {print $4}') / 1048576 ))
    [ "$free_gb" -ge "$2" ] || say "warning: only ${free_gb} GB free under $1; $3"
}

make_venv() {
    if [ ! -x "$1/bin/python" ]; then
        say "creating $1"
        "$PYTHON" -m venv "$1" 2>/dev/null || { apt_install python3-venv && "$PYTHON" -m venv "$1"; }
    fi
}
# No pip cache: it would keep a second copy of every wheel (over 3 GB) that nothing reuses.
pip_install() { "$1/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "${@:2}"; }

make_venv "$VENV"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    say "installing Python packages (PyTorch is about 5 GB with its CUDA libraries; a few minutes)"
    # The packages take about 6 GB installed, and the downloads need room of their own while
    # they unpack; a full disk otherwise shows up as a bare pip OSError halfway through.
    warn_if_short "$VENV" 8 "the install needs about 8 GB"
    pip_install "$VENV" --upgrade pip
    pip_install "$VENV" -r "$REQUIREMENTS"
    echo "$want" > "$VENV/.requirements.sha256"
fi

make_venv "$CLIENTS_VENV"
want=$(sha256sum "$CLIENTS_REQUIREMENTS" | cut -d' ' -f1)
if [ "$(cat "$CLIENTS_VENV/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
    say "installing the protocol clients (tritonclient, kserve) in $CLIENTS_VENV"
    pip_install "$CLIENTS_VENV" --upgrade pip
    pip_install "$CLIENTS_VENV" -r "$CLIENTS_REQUIREMENTS"
    echo "$want" > "$CLIENTS_VENV/.requirements.sha256"
fi

torch_dir=$("$VENV/bin/python" -c 'import importlib.util, os; print(os.path.dirname(importlib.util.find_spec("torch").origin))')
if [ "$(readlink .libtorch 2>/dev/null)" != "$torch_dir" ]; then
    ln -sfn "$torch_dir" .libtorch
    say "libtorch: $torch_dir"
fi

# The container tests (tests/container.rs) build the image and run it: Docker's engine from
# Debian's packages, started here when it is not running, and a Debian base image made here with
# mmdebstrap, which needs no image registry. Where that cannot be done (no root or apt, an engine
# that will not start, or TCHSERVE_SKIP_DOCKER=1), build/docker/unavailable says why, and the
# container tests skip, printing it.
setup_docker() {
    local marker=build/docker/unavailable root=0
    mkdir -p build/docker
    unavailable() { say "$1: the container tests will skip"; echo "$1" > "$marker"; }
    if [ -n "${TCHSERVE_SKIP_DOCKER:-}" ]; then
        unavailable "TCHSERVE_SKIP_DOCKER is set"; return
    fi
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && root=1
    if ! command -v dockerd >/dev/null || ! command -v mmdebstrap >/dev/null; then
        [ "$root" = 1 ] || { unavailable "no Docker engine or mmdebstrap, and no root to install them"; return; }
        apt_install docker.io mmdebstrap
    fi
    if ! docker info >/dev/null 2>&1; then
        [ "$root" = 1 ] || { unavailable "Docker's engine is not running"; return; }
        say "starting Docker's engine (log: build/docker/dockerd.log)"
        nohup dockerd >build/docker/dockerd.log 2>&1 &
        for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
        docker info >/dev/null 2>&1 || {
            unavailable "Docker's engine did not start ($(tail -1 build/docker/dockerd.log))"; return; }
    fi
    if ! docker image inspect local/debian:bookworm >/dev/null 2>&1; then
        say "making the base image local/debian:bookworm with mmdebstrap"
        mmdebstrap --quiet --variant=minbase bookworm build/docker/rootfs.tar \
            && docker import build/docker/rootfs.tar local/debian:bookworm >/dev/null
        rm -f build/docker/rootfs.tar
        docker image inspect local/debian:bookworm >/dev/null 2>&1 || {
            unavailable "the base image could not be made"; return; }
    fi
    rm -f "$marker"
}
setup_docker

# A first build needs room beyond the Python environments: target/ (about 2.5 GB with the test
# fixtures), the container image and its build (up to 2.4 GB), the examples and the tests' own
# files (about 2 GB at the peak). Running out halfway shows up as an unrelated-looking failure.
[ -e target/release/tchserve ] || warn_if_short . 8 "building and testing need about 8 GB more"
