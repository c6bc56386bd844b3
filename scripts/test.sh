#!/usr/bin/env bash
# Set-up, then the test suite (pytest). Extra arguments go to pytest:
#   scripts/test.sh                 the suite (CI: .ci/run), without the `heavy` tests (pyproject.toml)
#   scripts/test.sh -m heavy        the heavy tests: a two-node Ray cluster, hostile clients, a kill -9 trial, ...
#   scripts/test.sh -m "not slow"   the fast tier, for the edit-test loop (no end-to-end runs,
#                                   subprocesses or deployments; see the `slow` marker in pyproject.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
