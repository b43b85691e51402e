"""Losses: multi-label (BCE, focal, class-balanced, distribution-balanced, asymmetric),
contrastive (GCL, QCL, DQR) and co-occurrence-aware (COA). See docs/method.md.

Submodules are imported where used, so importing the package pulls in no heavy stack.
"""
