#!/usr/bin/env bash
# Reproduce the shipped checkpoints under cdm_dist/checkpoints/ (CPU: about 40 minutes on 2 cores).
# Usage: scripts/train_checkpoints.sh [OUT_DIR] [PROBLEM...]   (default: cdm_dist/checkpoints, every problem)
set -euo pipefail
out=${1:-cdm_dist/checkpoints}
shift || true
problems=("${@:-gmm2d gmm5d gmm10d digits}")
for problem in ${problems[*]}; do
  for role in prior sampler; do
    if [[ -f "$out/$problem/$role/manifest.json" ]]; then
      echo "skip $out/$problem/$role (exists)"
      continue
    fi
    cdm train "$role" --problem "$problem" --out "$out/$problem/$role" --seed 0
  done
done
