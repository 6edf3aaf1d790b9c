#!/usr/bin/env bash
# Install Debian's chromium for the headless-browser test of the inspect page (tests/viz/test_browser.py).
# Called by .ci/run before `make test`; a no-op when chromium is already there. Needs root (CI runs as root).
set -euo pipefail
if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation fonts-dejavu-core >/dev/null  # fonts: text must render
chromium --version || true  # the Debian wrapper may warn on stderr; the install is what counts
