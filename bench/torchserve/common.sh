# Shared by the scripts that run TorchServe 0.12.0 beside tchserve; sourced, not run.
# Expects $root (the repository) and $tsvenv (the venv, relative to $root).

# Installs TorchServe 0.12.0 in $tsvenv on first use: the PyTorch pinned in
# scripts/requirements.txt, torchvision and Pillow for its image handlers, PyYAML and Captum,
# which its workers import, and matplotlib for the charts (from PyPI, about 5 GB).
ensure_torchserve() {
    if [ ! -x "$root/$tsvenv/bin/torchserve" ]; then
        python3 -m venv "$root/$tsvenv"
        req() { grep "^$1==" "$root/scripts/requirements.txt"; }
        "$root/$tsvenv/bin/python" -m pip install -q --no-cache-dir "$(req torch)" "$(req torchvision)" \
            "$(req pillow)" torchserve==0.12.0 torch-model-archiver==0.12.0 pyyaml captum matplotlib
    fi
    "$root/$tsvenv/bin/python" -c 'import matplotlib' 2>/dev/null \
        || "$root/$tsvenv/bin/python" -m pip install -q --no-cache-dir matplotlib
}

# The processes of a tree, its root first.
tree_pids() {
    pstree -p -T "$1" | grep -o '([0-9]\+)' | tr -d '()'
}

# Memory of a process and every process below it, in MB: the proportional set size, which
# counts a page shared by several processes (libtorch's code in each of TorchServe's workers)
# once in all, where summing resident sizes would count it in each.
pss_tree() {
    local total=0 p
    for p in $(tree_pids "$1"); do
        total=$((total + $(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0)))
    done
    echo $((total / 1024))
}

# CPU time of a process and every process below it so far, in clock ticks.
cpu_tree() {
    local total=0 p
    for p in $(tree_pids "$1"); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}
