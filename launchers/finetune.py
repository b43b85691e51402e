"""Phase 2: DP-VLPA adaptation (task: dpvlpa) or the CPRFL head (task: cprfl), from a
pretraining export (model.init_from) or a plain backbone.

    accelerate launch launchers/finetune.py --config configs/finetune/demo_cprfl.yaml [k=v ...]
"""

import sys

from ltdist.train.commands import train_main

if __name__ == "__main__":
    sys.exit(train_main(("dpvlpa", "cprfl"), description=__doc__))
