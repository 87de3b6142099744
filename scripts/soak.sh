#!/usr/bin/env bash
# Long soak of `blockcascade serve` on loopback: CLIENTS concurrent WebSocket clients for
# SECONDS seconds (starts, prompt switches, stops, restarts, disconnects mid-stream, garbage
# messages) against the serve command in its own process (`--max-streams 4`, unpaced, the
# built-in tiny model), whose resident memory is sampled every second. Fails on a panic, a
# protocol violation, a stream left running at the end, or memory that doubled after warm-up.
# Prints the tallies and the memory samples' summary.
#
#   scripts/soak.sh SECONDS CLIENTS        e.g. scripts/soak.sh 600 12
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 2 || ! $1 =~ ^[0-9]+$ || ! $2 =~ ^[0-9]+$ || $1 -eq 0 || $2 -eq 0 ]]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
BC_SOAK_SECONDS=$1 BC_SOAK_CLIENTS=$2 \
  cargo test --test serve -- --ignored --exact soak::long_soak --nocapture
