#!/usr/bin/env bash
# Builds the GPU validation bundle: release test binary of tests/cuda.rs, the CLI, the gpu
# benchmark, the PyTorch baseline, tests/data and run.sh (from scripts/gpu-run.sh) in one
# folder (< 64 MiB) that runs on a Linux x86-64 machine with an NVIDIA driver, without a Rust
# toolchain or network. The kernels must be built (nvcc found: run
# scripts/install-cuda-toolchain.sh first), otherwise the bundle would only say NOT_BUILT.
#
# Usage: scripts/gpu-bundle.sh [OUT_DIR]   (default: target/gpu-bundle)
# Then on the GPU machine: OUT_DIR/run.sh device   (one bounded call, BC_BUDGET_S seconds, default
# 420; writes summary.txt and logs.tar.gz to $OUT; see docs/gpu-bundle.md), or
# OUT_DIR/run.sh [PARTS] (prints one summary table; logs in OUT_DIR/logs).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/target/gpu-bundle}
cd "$root"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}

exe_of() { # filter cargo JSON messages for executables of target kind $1 and name $2
    python3 -c '
import json, sys
kind, name = sys.argv[1], sys.argv[2]
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name and kind in m["target"]["kind"]:
        print(m["executable"])
' "$1" "$2" | tail -n 1
}

echo "building release binaries (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)..." >&2
cargo build --release --bin blockcascade >&2
cli=$CARGO_TARGET_DIR/release/blockcascade
if "$cli" info --kernels 2>/dev/null | grep -q "kernels were not built"; then
    echo "error: the kernels were not built (no nvcc): run scripts/install-cuda-toolchain.sh" >&2
    exit 1
fi
tests=$(cargo test --release --no-run --message-format=json --test cuda 2>/dev/null | exe_of test cuda)
bench=$(cargo bench --no-run --message-format=json --bench gpu 2>/dev/null | exe_of bench gpu)
[ -x "$tests" ] || { echo "error: test binary not found" >&2; exit 1; }
[ -x "$bench" ] || { echo "error: bench binary not found" >&2; exit 1; }

rm -rf "$out"
mkdir -p "$out/bin" "$out/data"
cp "$cli" "$out/bin/blockcascade"
cp "$tests" "$out/bin/cuda-tests"
cp "$bench" "$out/bin/gpu-bench"
strip --strip-debug "$out/bin/"* 2>/dev/null || true
cp -r tests/data/selfforcing-tiny tests/data/umt5-tiny tests/data/decode "$out/data/"
cp benches/pytorch_baseline.py benches/pytorch_text_encoder.py benches/pytorch_decode.py scripts/ncu_summary.py "$out/"
# The PyTorch decode baseline on the GPU runs diffusers' AutoencoderKLWan (the public Wan VAE),
# which the GPU image lacks (it has torch and diffusers' other needs): its pure-Python wheels
# travel in the bundle (about 6.4 MiB), downloaded once from PyPI into target/pip-wheels.
# Without a network the bundle is built without them and run.sh says "SKIP pytorch decode".
wheels=$CARGO_TARGET_DIR/pip-wheels
want_wheels="diffusers==0.42.1 importlib_metadata==10.2.0"
if [ "$(cat "$wheels/.ok" 2>/dev/null)" != "$want_wheels" ]; then
    rm -rf "$wheels"
    # shellcheck disable=SC2086
    if python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheels" $want_wheels >&2; then
        echo "$want_wheels" > "$wheels/.ok"
    else
        echo "warning: could not download $want_wheels: the bundle's PyTorch decode baseline will be skipped" >&2
    fi
fi
if [ -f "$wheels/.ok" ]; then
    mkdir -p "$out/wheels"
    cp "$wheels"/*.whl "$out/wheels/"
fi
cp scripts/gpu-run.sh "$out/run.sh"
chmod +x "$out/run.sh" "$out/bin/"*
if commit=$(git -C "$root" rev-parse HEAD 2>/dev/null); then
    # Tracked files changed since the commit are in the binaries too: say so.
    [ -z "$(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null)" ] || commit="$commit (with uncommitted changes)"
    echo "$commit" > "$out/COMMIT"
fi
size=$(du -sk "$out" | cut -f1)
echo "bundle: $out ($((size / 1024)) MiB)" >&2
# The bundle compressed (about 21 MiB: the binaries carry the kernels' fatbin three times), for
# the device tool, which sends the working tree plus carried paths, 64 MiB in all:
#   run(command="mkdir -p /tmp/b && tar xzf target/gpu-pack/bundle.tar.gz -C /tmp/b &&
#       bash /tmp/b/gpu-bundle/run.sh device", carry=["target/gpu-pack"], timeout_s=470)
pack=$CARGO_TARGET_DIR/gpu-pack
mkdir -p "$pack"
rm -f "$pack/bundle.tar.gz"
tar czf "$pack/bundle.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
psize=$(du -sk "$pack" | cut -f1)
echo "packed: $pack/bundle.tar.gz ($((psize / 1024)) MiB)" >&2
size=$psize
if [ "$size" -ge $((64 * 1024)) ]; then
    echo "error: the packed bundle is over 64 MiB" >&2
    exit 1
fi
tree=$( (git -C "$root" ls-files -co --exclude-standard -z 2>/dev/null | (cd "$root" && xargs -0 -r du -cb 2>/dev/null) | tail -n 1 | cut -f1) || echo 0)
total=$(( size / 1024 + ${tree:-0} / 1048576 ))
echo "working tree + bundle: about $total MiB (the device tool sends at most 64 MiB)" >&2
[ "$total" -lt 62 ] || echo "warning: working tree + bundle may be over the device tool's 64 MiB" >&2
