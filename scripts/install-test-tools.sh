#!/usr/bin/env bash
# Installs the command-line tools the test suite checks outputs with (Debian's packages):
# - ffmpeg/ffprobe, to probe and decode the .mp4 and .y4m the video writers make;
# - chromium, headless, to load the `serve` viewer page and watch it play (tests/serve).
# The project itself never runs them. Idempotent and quick when already installed.
# Usage: scripts/install-test-tools.sh
set -euo pipefail

want=()
if ! command -v ffprobe >/dev/null 2>&1 || ! command -v ffmpeg >/dev/null 2>&1; then
  want+=(ffmpeg)
fi
if ! command -v chromium >/dev/null 2>&1; then
  want+=(chromium)
fi

if [[ ${#want[@]} -gt 0 ]]; then
  SUDO=""
  if [[ "$(id -u)" != 0 ]]; then
    SUDO="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi
echo "test tools: $(ffprobe -version | head -n 1)"
echo "test tools: $(chromium --version 2>/dev/null || echo 'chromium (version unknown)')"
