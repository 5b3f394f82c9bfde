#!/usr/bin/env bash
# Install dist_ptq into .venv (created if missing) and run the main job on the bundled model.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e .
exec .venv/bin/dist-ptq demo "$@"
