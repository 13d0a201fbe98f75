#!/usr/bin/env bash
# Installs what the browser tests (tests/test_web_browser.py) need:
#   * Debian's chromium and chromium-driver (when /usr/bin/chromium is missing), and
#   * Playwright's Python package in the active Python environment.
# Playwright drives the system Chromium (executable_path=/usr/bin/chromium), so its own
# browser download (`playwright install`) is never run: it would fetch a browser build
# from outside the package registries.
set -euo pipefail

PYTHON="${PYTHON:-python}"

if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" -ne 0 ]; then
        SUDO=sudo
    else
        SUDO=
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core
fi

if ! "$PYTHON" -c "import playwright" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "playwright>=1.40"
fi

echo "browser test dependencies: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium missing'),"\
" playwright $("$PYTHON" -c 'from importlib.metadata import version; print(version("playwright"))')"
