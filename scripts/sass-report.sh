#!/usr/bin/env bash
# SASS report of the compiled kernels: per kernel and arch, registers, spills, BRA, HMMA,
# LDSM, MUFU.EX2, f64 instructions, shared-memory base reads (SR_CgaCtaId) and the shortest
# LDSM -> dependent HMMA distance of the main loop (see scripts/sass_report.py). Reads the
# fatbin build.rs writes (the newest target/*/build/blockcascade-*/out/blockcascade.fatbin;
# build first: cargo build). Installs pinned cuobjdump/nvdisasm from PyPI into
# .cuda-sass-tools/ (no GPU or driver needed; the first 13.x wheels on PyPI are 13.2, they read
# the cubins of the pinned nvcc 13.0).
# Usage: scripts/sass-report.sh [--check] [--fatbin FILE] [--dump DIR]
#   --check   fail (exit 1) past the limits in scripts/sass-limits.txt (CI runs this)
#   --dump    also write the full SASS per arch into DIR
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cuda-sass-tools"
PKGS=(
  nvidia-cuda-cuobjdump==13.2.86
  nvidia-cuda-nvdisasm==13.2.86
)
BIN="$DEST/nvidia/cu13/bin"
STAMP="$DEST/.installed"
WANT="${PKGS[*]}"

if [[ ! -x "$BIN/cuobjdump" || ! -x "$BIN/nvdisasm" || ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  PY="${PYTHON:-python3}"
  rm -rf "$DEST"
  mkdir -p "$DEST"
  "$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$DEST" "${PKGS[@]}"
  chmod +x "$BIN"/* 2>/dev/null || true
  echo "$WANT" > "$STAMP"
fi

ARGS=(--bin "$BIN" --limits "$ROOT/scripts/sass-limits.txt")
FATBIN=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --check) ARGS+=(--check); shift ;;
    --fatbin) FATBIN="$2"; shift 2 ;;
    --dump) ARGS+=(--dump "$2"); shift 2 ;;
    *) echo "usage: $0 [--check] [--fatbin FILE] [--dump DIR]" >&2; exit 2 ;;
  esac
done
if [[ -z "$FATBIN" ]]; then
  FATBIN="$(ls -t "$ROOT"/target/*/build/blockcascade-*/out/blockcascade.fatbin 2>/dev/null | head -n 1 || true)"
fi
if [[ -z "$FATBIN" || ! -f "$FATBIN" ]]; then
  echo "sass-report: no kernel fatbin found: install nvcc (scripts/install-cuda-toolchain.sh) and run cargo build" >&2
  exit 1
fi
echo "fatbin: $FATBIN"
exec "${PYTHON:-python3}" "$ROOT/scripts/sass_report.py" --fatbin "$FATBIN" "${ARGS[@]}"
