#!/usr/bin/env bash
# Reproduce the shipped checkpoints under cdm_dist/checkpoints/ (CPU: about 95 minutes on 2 cores).
# Usage: scripts/train_checkpoints.sh [OUT_DIR] [PROBLEM...]   (default: cdm_dist/checkpoints, every problem)
# The one-step sampler distils the flow sampler trained just before it (its teacher).
set -euo pipefail
out=${1:-cdm_dist/checkpoints}
shift || true
problems=("${@:-gmm2d gmm5d gmm10d digits scribbles}")
for problem in ${problems[*]}; do
  for role in prior sampler sampler_one_step; do
    if [[ $problem == scribbles && $role == sampler_one_step ]]; then
      continue  # the scribbles sampler (a one-step generator + its embedding) is trained in one step already
    fi
    if [[ -f "$out/$problem/$role/manifest.json" ]]; then
      echo "skip $out/$problem/$role (exists)"
      continue
    fi
    if [[ $role == sampler_one_step ]]; then
      cdm train sampler --problem "$problem" --kind one_step --teacher "$out/$problem/sampler" \
        --out "$out/$problem/$role" --seed 0
    else
      cdm train "$role" --problem "$problem" --out "$out/$problem/$role" --seed 0
    fi
  done
  if [[ $problem == digits && ! -f "$out/digits/judge/manifest.json" ]]; then
    cdm train judge --problem digits --out "$out/digits/judge" --seed 0  # the digit judge of `cdm bench digits`
  fi
  if [[ $problem == digits && ! -f "$out/digits/reader/manifest.json" ]]; then
    # the upright reader; the digits sampler's readable labels come from the shipped one (this command's output)
    cdm train reader --problem digits --out "$out/digits/reader" --seed 0
  fi
done
