"""``ltdist rehearse``: a shipped config through the code path of a cluster run, here, first.

- :mod:`ltdist.rehearsal.plan`: the plan at a cluster shape (no model built, seconds).
- :mod:`ltdist.rehearsal.standin`: stand-in images at a split's own file names, packed into
  shards by the real packer.
- :mod:`ltdist.rehearsal.run`: the config at reduced width, launched as a cluster run is
  (``accelerate launch``, 2 processes): steps, checkpoint, kill, resume, export, evaluate,
  predict, and the export's outputs against the trained model's.
"""

from ltdist.rehearsal.plan import (
    CLUSTER_SHAPES,
    PlanResult,
    Shape,
    config_kind,
    own_shape,
    plan_config,
    shipped_configs,
)

__all__ = [
    "CLUSTER_SHAPES",
    "PlanResult",
    "Shape",
    "config_kind",
    "own_shape",
    "plan_config",
    "shipped_configs",
]
