"""Models in plain PyTorch: CLIP towers (open_clip), the Q-Former, DP-VLPA, CPRFL, baselines.

Accelerate/DeepSpeed wrap them from outside; no model calls torch.distributed except through
``ltdist.distributed``. Submodules are imported where used (open_clip loads only on demand).
"""
