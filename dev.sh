#!/usr/bin/env bash
# dev.sh: the project's one entry point on a fresh machine.
#
# It installs libtorch from the PyPI `torch==2.11.0` wheel into a virtual environment
# cached outside the clone (keyed by torch and Python version), links it as `.venv`,
# and runs cargo with that environment so `tch` builds against it.
#
#   ./dev.sh demo            set up, build (release) and run the built-in tiny demo
#   ./dev.sh test            set up and run the whole test suite and the doc examples, then build the docs (no warning)
#   ./dev.sh build [--cuda]  set up and build the release binary (CUDA: libtorch_cuda linked)
#   ./dev.sh setup           only install the Python environment
#   ./dev.sh cargo ARGS...   any cargo command inside the environment
#
# Environment: DANCEGRPO_CACHE (default ~/.cache/dancegrpo), PYTHON (default python3).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TORCH_VERSION=2.11.0
PY=${PYTHON:-python3}

die() { echo "dev.sh: $*" >&2; exit 1; }

venv_dir() {
    command -v "$PY" >/dev/null || die "no '$PY' on PATH: install Python 3.10+ (or set PYTHON)"
    local tag
    tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    local cache=${DANCEGRPO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dancegrpo}
    echo "$cache/venv-torch-$TORCH_VERSION-$tag"
}

# Creates the cached environment once; a half-made one is never used (built under
# a temporary name, renamed when complete, guarded by a lock).
setup() {
    local venv
    venv=$(venv_dir)
    mkdir -p "$(dirname "$venv")"
    if [ ! -f "$venv/.complete" ]; then
        exec 9>"$venv.lock"
        flock 9
        if [ ! -f "$venv/.complete" ]; then
            echo "dev.sh: installing torch==$TORCH_VERSION into $venv (once per machine)" >&2
            rm -rf "$venv.partial" "$venv"
            "$PY" -m venv "$venv.partial"
            "$venv.partial/bin/python" -m pip install --quiet --no-input "torch==$TORCH_VERSION"
            "$venv.partial/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
            # scripts (torchrun, activate) name the directory they were built in
            local f
            for f in "$venv.partial"/bin/*; do
                if [ -f "$f" ] && [ ! -L "$f" ] && grep -q "$venv.partial" "$f" 2>/dev/null; then
                    sed -i "s|$venv.partial|$venv|g" "$f"
                fi
            done
            touch "$venv.partial/.complete"
            mv "$venv.partial" "$venv"
        fi
        exec 9>&-
    fi
    ln -sfn "$venv" "$ROOT/.venv"
    export VIRTUAL_ENV="$ROOT/.venv"
    export PATH="$ROOT/.venv/bin:$PATH"
    export LIBTORCH_USE_PYTORCH=1
}

# The CUDA headers torch's wheel brings lack the compiler's `crt/` and CCCL's
# `nv/target`, which PyTorch's NCCL process-group header needs: add the
# header-only wheels of the same CUDA release (once, under the lock).
cuda_headers() {
    local venv cuda
    venv=$(venv_dir)
    cuda=$("$venv/bin/python" -c 'import importlib.metadata as m; v = m.version("nvidia-cuda-runtime").split("."); print(v[0] + "." + v[1])' 2>/dev/null) \
        || die "no nvidia-cuda-runtime in $venv: a CPU-only torch wheel?"
    if ! "$venv/bin/python" -c 'import importlib.metadata as m; m.version("nvidia-cuda-crt"); m.version("nvidia-cuda-cccl")' 2>/dev/null; then
        exec 9>"$venv.lock"
        flock 9
        echo "dev.sh: installing the CUDA $cuda compiler headers (nvidia-cuda-crt, nvidia-cuda-cccl) into $venv" >&2
        "$venv/bin/python" -m pip install --quiet --no-input --no-deps "nvidia-cuda-crt==$cuda.*" "nvidia-cuda-cccl==$cuda.*"
        exec 9>&-
    fi
}

build() {
    local features=()
    if [ "${1:-}" = "--cuda" ]; then
        cuda_headers
        features=(--features cuda)
    fi
    cargo build --release -p dancegrpo-cli "${features[@]}"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
cd "$ROOT"
case "$cmd" in
    setup) setup ;;
    build) setup; build "$@" ;;
    demo)
        setup
        build
        "$ROOT/target/release/dancegrpo" demo "$@"
        ;;
    test)
        setup
        log=$(mktemp)
        set +e
        # --no-fail-fast: a red run shows every failing test binary at once
        cargo test --workspace --release --lib --bins --tests --no-fail-fast "$@" 2>&1 | tee "$log"
        status=${PIPESTATUS[0]}
        # the examples in the documentation (load a model, one iteration, score images)
        cargo test --release --doc -p dancegrpo "$@" 2>&1 | tee -a "$log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        # the documentation builds without a warning (the library denies missing docs)
        RUSTDOCFLAGS="-D warnings" cargo doc --workspace --release --no-deps -q || status=1
        set -e
        # One closing line over every test binary.
        awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
        rm -f "$log"
        exit "$status"
        ;;
    cargo) setup; cargo "$@" ;;
    *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
