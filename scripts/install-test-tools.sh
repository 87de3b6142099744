#!/usr/bin/env bash
# Installs the command-line tools the test suite checks outputs with: ffmpeg/ffprobe (Debian's
# package) to probe and decode the .mp4 and .y4m the video writers make. The project itself never
# runs them. Idempotent and quick when already installed. Usage: scripts/install-test-tools.sh
set -euo pipefail

if command -v ffprobe >/dev/null 2>&1 && command -v ffmpeg >/dev/null 2>&1; then
  echo "test tools already installed: $(ffprobe -version | head -n 1)"
  exit 0
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null
echo "test tools installed: $(ffprobe -version | head -n 1)"
