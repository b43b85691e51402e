"""Group mAP (all / head / medium / tail), per-class AP vs frequency plot, and F1 at decision
thresholds, for an exported checkpoint on a shard split.

    python launchers/evaluate.py --export runs/demo/cprfl/export --data shards/demo --split test
    accelerate launch launchers/evaluate.py ...      # ranks split the batches
"""

import sys

from ltdist.train.commands import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
