#!/usr/bin/env bash
# The quick start's main job on the embedded default: demo data -> shards -> stats -> baseline
# (and its shuffled-label control) -> group-mAP reports and plots. Run by `make demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
LTDIST=.venvs/train/bin/ltdist

$LTDIST data demo --out data/demo
$LTDIST data pack --config configs/data/demo.yaml
$LTDIST data stats shards/demo
$LTDIST baseline --config configs/baseline/demo.yaml
$LTDIST baseline --config configs/baseline/demo.yaml shuffle_labels=true out=runs/demo/baseline_shuffled
echo
echo "reports: runs/demo/baseline/report.txt, runs/demo/baseline_shuffled/report.txt"
echo "plots:   runs/demo/baseline/ap_vs_frequency.png"
