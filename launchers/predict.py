"""Label new images with an exported checkpoint: its own classes (with its thresholds), or any
class names through the text side (open vocabulary).

    python launchers/predict.py --export runs/demo/cprfl/export photos/ a.jpg
    python launchers/predict.py --export runs/demo/pretrain/export photos/ --classes "cat,red kite"
"""

import sys

from ltdist.train.commands import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
