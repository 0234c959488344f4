#!/usr/bin/env bash
# System packages the tests need beyond pip: a real headless Chromium and its driver for the
# web demo's browser test (tests/test_serve.py). Installed from the distribution's packages
# when missing (Debian/Ubuntu: chromium, chromium-driver); needs root or sudo.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "system-deps: chromium/chromedriver missing and no apt-get here: install Chromium and its driver" \
         "(the browser test needs them)" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
