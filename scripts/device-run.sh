#!/usr/bin/env bash
# scripts/device-run.sh: the one command for a lent GPU machine, run from the
# repository root there with .device/ carried (scripts/device-kit.sh makes it).
# It points the binary at that machine's own torch 2.11 libraries (python3's
# torch), runs scripts/gpu-acceptance.sh and leaves in $OUT (at most 8 files):
#   summary.json        the acceptance summary (also printed last)
#   acceptance.log      the script's progress and errors
#   logs.tgz            each step's stdout/stderr and JSON (no checkpoints)
#   gpu.txt             nvidia-smi's view of the GPU (absent on a machine without one)
# Extra arguments go to gpu-acceptance.sh (`--device cpu --small` tries it on a CPU);
# DEVICE_KIT names another kit folder than .device/ (the test's).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
KIT=${DEVICE_KIT:-$ROOT/.device}
BIN=$KIT/dancegrpo
FIXTURE=$KIT/flux_tiny_a
OUT=${OUT:-$(mktemp -d -t dancegrpo-device.XXXXXX)}
[ -x "$BIN" ] || { echo "device-run: no $BIN (scripts/device-kit.sh, then carry .device)" >&2; exit 2; }

# without a torch in python3, the binary's own rpath (the build's libtorch) is left to find it
if lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null); then
    export LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
    echo "device-run: python3 has no torch; libtorch as the binary finds it" >&2
fi
command -v nvidia-smi >/dev/null \
    && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/gpu.txt"

work=$(mktemp -d -t dancegrpo-acceptance.XXXXXX)
"$ROOT/scripts/gpu-acceptance.sh" --bin "$BIN" --fixtures "$FIXTURE" --out "$work" "$@" \
    > "$OUT/summary.json" 2> "$OUT/acceptance.log"
status=$?
(cd "$work" && find . -maxdepth 1 -type f \( -name '*.json' -o -name '*.txt' -o -name '*.std*' -o -name '*.toml' \) -print0 \
    | tar -czf "$OUT/logs.tgz" --null -T -)
rm -rf "$work"
tail -n 20 "$OUT/acceptance.log" >&2
cat "$OUT/summary.json"
exit "$status"
