#!/usr/bin/env bash
# scripts/device-kit.sh: prepares, on this machine, what a lent GPU machine needs
# to run the GPU acceptance in one call, in .device/ (git-ignored):
#   .device/dancegrpo      the `cuda` binary (built in target/cuda, stripped)
#   .device/flux_tiny_a/   the public fixture the acceptance aligns on (the
#                          ../shared beside the checkout does not travel)
# Then, with the device tool, from the repository root:
#   run(command = "scripts/device-run.sh", carry = [".device"], timeout_s = 540)
# Everything that travels (the tracked tree and .device/) must stay under 64 MiB;
# the script stops if it does not.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FIXTURE=${1:-$ROOT/../shared/fixtures/public/flux_tiny_a}
LIMIT_MIB=64
[ -f "$FIXTURE/case.json" ] || { echo "device-kit: no case at $FIXTURE" >&2; exit 2; }

CARGO_TARGET_DIR=$ROOT/target/cuda "$ROOT/dev.sh" build --cuda
mkdir -p "$ROOT/.device"
strip -o "$ROOT/.device/dancegrpo" "$ROOT/target/cuda/release/dancegrpo"
rm -rf "$ROOT/.device/flux_tiny_a"
cp -r "$FIXTURE" "$ROOT/.device/flux_tiny_a"
chmod -R u+w "$ROOT/.device/flux_tiny_a"

kit=$(du -sb "$ROOT/.device" | cut -f1)
tree=$(cd "$ROOT" && git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
total_mib=$(( (kit + tree) / 1048576 ))
echo "device-kit: .device $(( kit / 1048576 )) MiB + tracked tree $(( tree / 1048576 )) MiB = $total_mib MiB (limit $LIMIT_MIB)" >&2
[ "$total_mib" -lt "$LIMIT_MIB" ] || { echo "device-kit: over the $LIMIT_MIB MiB a device call carries" >&2; exit 1; }
