#!/usr/bin/env bash
# The formatter and linter CI runs (configuration: [tool.ruff] in pyproject.toml).
# Fix what it reports with: ruff format . && ruff check --fix .
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "ruff>=0.6,<1"
python -m ruff format --check .
python -m ruff check .
