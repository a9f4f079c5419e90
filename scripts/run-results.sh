#!/usr/bin/env bash
# Every comparison behind RESULTS.md, in order, each timed: `make results DATA=/path/to/data`.
# DATA is the folder holding USPS/ and MNIST/raw/ (torchvision's layout); the digits comparisons need none.
# Re-running resumes: finished tuning trials and complete reruns are kept (see fuse_tune/compare.py).
set -euo pipefail
DATA=${DATA:?set DATA to the folder holding USPS/ and MNIST/raw/}
JOBS=${JOBS:-2}
FUSE_TUNE=${FUSE_TUNE:-.venv/bin/fuse-tune}
for name in ${COMPARISONS:-digits_logreg digits_mlp digits_cnn mnist_logreg usps_cnn usps_cnn_paper mnist_logreg_paper}; do
  start=$(date +%s)
  "$FUSE_TUNE" compare "studies/compare/$name.yaml" --n-jobs "$JOBS" --data-dir "$DATA" --out "results/$name" --quiet
  echo "== $name: $(( $(date +%s) - start )) s wall (--n-jobs $JOBS, $(nproc) cores)" | tee -a results/timings.txt
done
