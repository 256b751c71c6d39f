#!/usr/bin/env bash
# Headless Chromium for the MLflow UI test (tests/tracking/test_server.py::test_mlflow_ui_draws_the_loss_chart).
# Debian's `chromium` package, ~40 s to install; idempotent. Without it that one test skips.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "chromium: already installed ($(chromium --version 2>/dev/null | head -1))"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
$SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || {
  $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null
}
echo "chromium: installed ($(chromium --version 2>/dev/null | head -1))"
