#!/usr/bin/env bash
# Installs cascadec with its test dependencies and runs the test suite (README: "Run the tests").
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
python -m pytest -q "$@"
