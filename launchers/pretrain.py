"""DP-VLPA phase 1 (GCL + QCL) on STAG shards.

accelerate launch launchers/pretrain.py --config configs/pretrain/demo.yaml [key=value ...]
"""

import sys

from ltdist.train.commands import train_main

if __name__ == "__main__":
    sys.exit(train_main("pretrain", description=__doc__))
