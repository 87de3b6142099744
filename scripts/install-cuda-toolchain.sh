#!/usr/bin/env bash
# Installs a pinned CUDA 13.0 compiler toolchain (nvcc, ptxas, crt headers, cccl, nvvm,
# cudart headers) from PyPI wheels into .cuda-toolchain/ at the repository root.
# No GPU and no driver are needed: this only compiles kernels (build.rs finds nvcc at
# .cuda-toolchain/nvidia/cu13/bin/nvcc). Idempotent: does nothing if the pinned version is
# already there. Usage: scripts/install-cuda-toolchain.sh [--force]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cuda-toolchain"
PKGS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
)
STAMP="$DEST/.installed"
WANT="${PKGS[*]}"
NVCC="$DEST/nvidia/cu13/bin/nvcc"

if [[ "${1:-}" != "--force" && -x "$NVCC" && -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "cuda toolchain already installed: $NVCC"
  exit 0
fi

PY="${PYTHON:-python3}"
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST" "${PKGS[@]}"

BIN="$DEST/nvidia/cu13/bin"
# Wheels lose the executable bit on some pip versions.
chmod +x "$BIN"/* 2>/dev/null || true
find "$DEST/nvidia/cu13" -path '*nvvm/bin/*' -type f -exec chmod +x {} + 2>/dev/null || true
"$NVCC" --version | tail -n 2
echo "$WANT" > "$STAMP"
# build.rs cannot watch a folder that did not exist: make cargo rerun it to pick up nvcc.
touch "$ROOT/build.rs"
echo "cuda toolchain installed: $NVCC"
