#!/usr/bin/env bash
# Set up a fresh machine of this project's kind and run the whole test suite.
#   bash tests/run.sh [pytest args...]
# 1. a virtual environment .venv with torch (the CPU-capable wheel from the local cache) and every
#    extra; 2. podman + podman-compose for the container test (when the workplace's setup script
#    is there, run as root); promtool, kubectl, and Chromium with its driver for the page's
#    browser tests (as root); 3. ruff (lint and format check); 4. pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q torch==2.14.1 torchvision==0.29.1
python -m pip install -q -e '.[train,serve,tracing,client,dev,retrieval]'
SETUP=../shared/tools/container-setup.sh
if [ -f "$SETUP" ] && [ "$(id -u)" = 0 ]; then
  bash "$SETUP"
fi
# kubectl: Debian has no package of that name (its kubernetes-client is 1.20, too old for
# kustomize components); this kind of machine ships Google's `kubectl` package (kubectl 1.32,
# kustomize 5.5), installable by name where that repository is configured.
if [ "$(id -u)" = 0 ]; then
  if ! command -v promtool >/dev/null; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  # headless Chromium and its WebDriver for the page's browser tests (tests/test_page.py)
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
        chromium-driver; } >/dev/null \
      || echo 'Chromium cannot be installed here: tests/test_page.py will be skipped' >&2
  fi
  command -v kubectl >/dev/null \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null \
    || echo 'kubectl cannot be installed here: tests/test_deploy*.py will be skipped' >&2
fi
ruff check . && ruff format --check . >/dev/null || { echo 'ruff: run ruff check --fix . && ruff format .' >&2; exit 1; }
exec python -m pytest -q -ra "$@"
