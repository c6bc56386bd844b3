#!/usr/bin/env bash
# Set-up, then the test suite (pytest). Extra arguments go to pytest:
#   scripts/test.sh                 the full suite (CI: .ci/run)
#   scripts/test.sh -m "not slow"   the fast tier, for the edit-test loop (no end-to-end runs,
#                                   subprocesses or deployments; see the `slow` marker in pyproject.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
