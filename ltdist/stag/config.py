"""The STAG run's configuration (``python -m ltdist.stag_gen``) and the names its parts share:
the split it describes, the report's file, the statuses a sample ends with.

The driver, the actors (which get the config as a dict) and the report all read these, so they
live apart from each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ltdist.data.pack import PackConfig
from ltdist.entry import UserError
from ltdist.stag.engines import EngineConfig, TemplateEngine
from ltdist.stag.grammar import ConstraintConfig
from ltdist.stag.prompt import PAPER, StagPromptConfig
from ltdist.stag.validate import ValidationConfig

SPLIT = "train"  # the split that gets descriptions; the others are packed plainly
REPORT_FILE = "stag_report.json"
NOT_DESCRIBED = "not_described"  # status and stage of a sample that describe='tail' skips
# A sample's status: 'generated' (a valid description within max_attempts), 'fallback_caption'
# (no valid description: the caption is the text, description is null), 'fallback_template'
# (the rule-based writer's description), 'dropped' (no valid description and fallback: drop:
# not written, listed with its reasons among the shard's rejects), 'rejected' (image missing or
# unreadable: not written, listed with the reason) and 'not_described' (describe: tail kept it
# from the engine: its caption is the text, or the template writer's when it has none).
STATUSES = (
    "generated",
    "fallback_caption",
    "fallback_template",
    "dropped",
    "rejected",
    NOT_DESCRIBED,
)
Fallback = Literal["caption", "template", "drop"]
Describe = Literal["all", "tail"]


class StagError(UserError, ValueError):
    """A run that cannot start or cannot finish correctly (the message says what to do)."""


@dataclass
class StagConfig:
    """``python -m ltdist.stag_gen``: where records come from, the engine, prompt, validation,
    retries, fallback and the actor pool."""

    data: PackConfig = field(default_factory=lambda: PackConfig(out="shards/demo_stag"))
    engine: EngineConfig = field(default_factory=EngineConfig)
    prompt: StagPromptConfig = field(default_factory=StagPromptConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # constrained decoding (model engines): a grammar per tail set, absent classes as bad words
    constrain: ConstraintConfig = field(default_factory=ConstraintConfig)
    repair: bool = True  # deterministic repair (validate.repair) of an invalid text before a retry
    max_attempts: int = 3  # generations per sample; attempt a has seed hash(engine.seed, key, a)
    fallback: Fallback = "caption"  # what an image without a valid description gets
    # 'all' (the paper): every training image goes to the engine. 'tail': only images with a
    # tail label do (where STAG's tail emphasis applies); the others are written with their
    # caption as the text, status 'not_described'. A rerun must use the same value.
    describe: Describe = "all"
    # A text cut off by engine.max_tokens (finish_reason 'length') is invalid ('truncated'):
    # it may be short enough to pass validation but ends mid-sentence.
    reject_truncated: bool = True
    batch_size: int = 32  # rows per map_batches call (all go to the engine at once)
    num_actors: int = 0  # 0: one per num_gpus_per_actor GPUs in the cluster (at least 1)
    num_gpus_per_actor: float = -1  # -1: engine.tensor_parallel_size when the cluster has GPUs
    num_cpus_per_actor: float = 0.5  # fractional: a whole CPU per actor starves reads on 2 cores
    ray_address: str = ""  # "": RAY_ADDRESS (set by `ray job submit`) or a new local cluster
    # > 0: only the first `limit` training records (key order), e.g. to try a model on a large
    # data set; the label space still comes from the whole split. Use its own data.out.
    limit: int = 0
    # Environment variables of the actors; "{gpu_id}" in a value becomes the actor's first GPU
    # id, e.g. VLLM_CPU_OMP_THREADS_BIND="{gpu_id}" pins each CPU engine of a logical-GPU
    # cluster to its own core.
    env: dict[str, str] = field(default_factory=dict)
    progress: bool = True  # the live progress line
    # Debugging and tests: a JSONL file to which every actor appends the keys (and attempt) of
    # each batch it sends its engine; "" = off.
    record_requests: str = ""

    def validate(self) -> None:
        if self.describe not in ("all", "tail"):
            raise ValueError(f"describe must be 'all' or 'tail', got {self.describe!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit < 0:
            raise ValueError(f"limit must be >= 0 (0 = all records), got {self.limit}")
        if self.num_actors < 0:
            raise ValueError(f"num_actors must be >= 0 (0 = one per GPU), got {self.num_actors}")
        if self.num_cpus_per_actor <= 0:
            raise ValueError(f"num_cpus_per_actor must be > 0, got {self.num_cpus_per_actor}")
        if self.num_gpus_per_actor != -1 and self.num_gpus_per_actor < 0:
            raise ValueError(
                f"num_gpus_per_actor must be -1 (auto) or >= 0, got {self.num_gpus_per_actor}"
            )
        if (
            self.prompt.version == PAPER
            and self.validation.require_tail_tags
            and not self.constrain.grammar
        ):
            # the paper's prompt asks for no markup: only a grammar would put the tags in
            raise ValueError(
                "prompt.version=paper-v1 asks for no <tail> tags: set "
                "validation.require_tail_tags=false, or constrain.grammar=true to have them"
            )
        tp = self.engine.tensor_parallel_size
        if tp > 1 and 0 < self.num_gpus_per_actor < tp:
            raise ValueError(
                f"engine.tensor_parallel_size={tp} needs {tp} GPUs per actor, but "
                f"num_gpus_per_actor={self.num_gpus_per_actor}"
            )


def model_label(cfg: EngineConfig) -> str:
    """The model as samples and the report name it: as configured, 'rules-v1' for templates."""
    return TemplateEngine.model if cfg.kind == "template" else cfg.model
