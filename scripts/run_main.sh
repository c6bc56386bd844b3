#!/usr/bin/env bash
# The main job: set-up, then a short DISTREAL-vs-baselines simulation on the embedded digits data
# (no download) with time-varying resources, then one comparison plot and a summary table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
out=${OUT_DIR:-outputs/main_job}
rm -rf "$out"
.venv/bin/python -m flwr_distreal.main -m strategy=distreal,full,small,feddropout,heterofl \
  resources=timevarying resources.lam=2 hydra.sweep.dir="$out" "$@"
.venv/bin/python scripts/plot_runs.py "$out" --title "digits (embedded), time-varying resources, lambda=2"
echo "Per-run metrics, resolved configs and plots: $out/<job>_<strategy>_lam2.0_seed0/"
