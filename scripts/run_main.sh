#!/usr/bin/env bash
# The main job: set-up, then a fair comparison at small scale on the embedded digits data (no
# download): DISTREAL (learned and uniform LUT), full resources, small network, Federated Dropout
# and HeteroFL, each at its lr tuned on a validation split, the same recipe, seeds 0-2,
# time-varying resources (lambda = 2); one progress line per run, then the table (mean +- s.d.).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
out=${OUT_DIR:-outputs/main_job}
rm -rf "$out"
.venv/bin/python -m flwr_distreal.main -m +experiment=main_digits hydra.sweep.dir="$out" "$@"
echo "Report (tables, curves with mean +- s.d. bands): $out/report/  Per-run metrics and configs: $out/<job>_<method>_seed<seed>/"
