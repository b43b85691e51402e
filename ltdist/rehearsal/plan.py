"""The rehearsal's plan: what a config will do at a cluster shape, before any model is built.

The plan (``--plan``; seconds, no model built) sizes the run from the real data set (the shard
index where the shards exist, else the benchmark's split files, else the demo's generator) at
the cluster shape the config states, or at the shapes asked for, and refuses, naming the key and
a value that would work, a config that cannot finish as configured: the same
:func:`ltdist.train.plan.plan_training` the training loop runs, plus the checks only a
rehearsal makes (an open_clip pretrained tag the model does not have).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

import yaml

from ltdist.config import ConfigError, load_config
from ltdist.train.config import TrainConfig
from ltdist.train.plan import Problem, plan_training

log = logging.getLogger(__name__)

# The shapes every shipped config is planned at besides its own (nodes, GPUs per node).
CLUSTER_SHAPES = ((1, 8), (2, 8), (8, 8))


@dataclass
class Shape:
    nodes: int
    gpus_per_node: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def __str__(self) -> str:
        return f"{self.nodes}x{self.gpus_per_node}"

    @classmethod
    def parse(cls, text: str) -> Shape:
        nodes, sep, gpus = text.lower().partition("x")
        if not sep or not nodes.isdigit() or not gpus.isdigit() or not int(nodes) or not int(gpus):
            raise ValueError(f"a cluster shape is NODESxGPUS (e.g. 2x8), got {text!r}")
        return cls(int(nodes), int(gpus))


@dataclass
class DataSizes:
    num_train: int
    num_eval: int | None
    source: str  # where the counts come from, for the printout


@dataclass
class PlanResult:
    config: str
    kind: str  # train | stag
    shape: Shape
    table: str
    changes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        head = f"{self.config} at {self.shape} ({self.shape.world_size} processes)"
        lines = [head, self.table]
        lines += [f"  rescaled: {c}" for c in self.changes]
        if self.changes and not self.ok:
            lines.append("  (the values below are the rescaled ones, at this shape)")
        if self.ok:
            lines.append("  PASS")
        else:
            lines += [f"  REFUSED {p}" for p in self.problems]
        return "\n".join(lines)


def config_kind(path: str) -> str:
    """'train' (has a ``task``) or 'stag' (has an ``engine``), from the YAML's top level."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if "task" in data:
        return "train"
    if "engine" in data:
        return "stag"
    raise ConfigError(f"{path}: neither a training config (task:) nor a STAG config (engine:)")


def own_shape(path: str, overrides: list[str] = ()) -> Shape:
    """The shape a config states (``cluster``); a config that states none runs on one process."""
    if config_kind(path) != "train":
        return Shape(1, 1)
    return _stated_shape(load_config(TrainConfig, path, list(overrides)))


def _stated_shape(cfg: TrainConfig) -> Shape:
    cluster = cfg.cluster
    return Shape(cluster.nodes, cluster.gpus_per_node) if cluster.nodes else Shape(1, 1)


def plan_config(
    path: str, shape: Shape | None = None, overrides: list[str] = (), splits_dir: str = ""
) -> PlanResult:
    """The plan of one config at ``shape`` (default: its own)."""
    if config_kind(path) == "stag":
        return _plan_stag(path, shape or Shape(1, 1), list(overrides), splits_dir)
    cfg = load_config(TrainConfig, path, list(overrides))
    shape = shape or _stated_shape(cfg)
    sizes = data_sizes(cfg, splits_dir)
    run, plan = plan_training(
        cfg, sizes.num_train, shape.world_size, sizes.num_eval, image_tokens(cfg)
    )
    problems = plan.problems + tag_problems(run)
    table = f"  data               {sizes.source}\n{plan.table()}"
    return PlanResult(path, "train", shape, table, plan.changes, problems)


# -- sizes ------------------------------------------------------------------------------------


def data_sizes(cfg: TrainConfig, splits_dir: str = "") -> DataSizes:
    """Training and evaluation sample counts: the shard index where the shards exist, else
    the data set's own definition (``data.dataset``: split files or the demo generator)."""
    from ltdist import storage
    from ltdist.data.shards import index_location, load_index

    loc, d = cfg.data.location, cfg.data
    if storage.exists(index_location(loc, d.train_split)):
        n_eval = None
        if d.eval_split and storage.exists(index_location(loc, d.eval_split)):
            n_eval = load_index(loc, d.eval_split).num_samples
        return DataSizes(load_index(loc, d.train_split).num_samples, n_eval, f"shards at {loc}")
    if d.dataset == "demo":
        from ltdist.data.demo import DemoConfig

        demo = DemoConfig()
        return DataSizes(demo.num_train, demo.num_test, "the demo generator's defaults")
    if d.dataset in ("coco_lt", "voc_lt"):
        from ltdist.data.splits import load_split_records

        where = splits_dir or "data/splits"
        n_eval = len(load_split_records(d.dataset, where, "test")) if d.eval_split else None
        if d.planned_train_samples:
            return DataSizes(
                d.planned_train_samples,
                n_eval,
                f"data.planned_train_samples (an estimate until the shards exist); "
                f"evaluation: the {d.dataset} test split in {where}",
            )
        n_train = len(load_split_records(d.dataset, where, "train"))
        return DataSizes(n_train, n_eval, f"{d.dataset} split files in {where}")
    raise ConfigError(
        f"cannot size the plan: no shard index at {loc} and data.dataset is "
        f"{d.dataset!r} (set it to coco_lt, voc_lt or demo, or build the shards first)"
    )


def image_tokens(cfg: TrainConfig) -> int:
    """Visual tokens per image of the model's image side (0 where unknown)."""
    m, size = cfg.model, cfg.loader.image_size
    if cfg.task == "cprfl" and m.backbone.kind == "resnet101":
        return (size // 32) ** 2
    clip = m.clip
    if clip.tiny:
        return (clip.image_size // clip.tiny_patch_size) ** 2 + 1
    try:
        import open_clip

        vision = (open_clip.get_model_config(clip.model_name) or {}).get("vision_cfg", {})
    except ImportError:  # the generation environment has no open_clip
        return 0
    patch = vision.get("patch_size")
    return (clip.image_size // patch) ** 2 + 1 if patch else 0


def tag_problems(cfg: TrainConfig) -> list[Problem]:
    """An open_clip pretrained tag that the model name does not have (a typo costs a job)."""
    towers = [("model.clip", cfg.model.clip)]
    if cfg.task == "cprfl" and cfg.model.backbone.kind == "clip":
        towers.append(("model.backbone.clip", cfg.model.backbone.clip))
    problems = []
    for key, tower in towers:
        tag = tower.pretrained
        if tower.tiny or not tag or os.path.sep in tag or os.path.exists(tag):
            continue  # random weights or a checkpoint file: nothing to look up
        try:
            import open_clip
        except ImportError:
            continue
        tags = open_clip.list_pretrained_tags_by_model(tower.model_name)
        if tag not in tags:
            problems.append(
                Problem(
                    f"{key}.pretrained",
                    f"open_clip has no tag {tag!r} for {tower.model_name}",
                    tags[0] if tags else "",
                )
            )
    return problems


# -- STAG -------------------------------------------------------------------------------------


def _plan_stag(path: str, shape: Shape, overrides: list[str], splits_dir: str) -> PlanResult:
    from ltdist.stag.config import StagConfig

    cfg = load_config(StagConfig, path, overrides)
    problems: list[Problem] = []
    d = cfg.data
    if d.source == "benchmark":
        from ltdist.data.splits import label_space, load_split_records

        where = splits_dir or d.splits_dir
        records = load_split_records(d.benchmark, where, "train")
        space = label_space(d.benchmark, where)
        source = f"{d.benchmark} split files in {where}"
    elif os.path.exists(d.manifests.get("train", "")):
        from ltdist.data.pack import load_records

        space, by_split, _ = load_records(cfg.data)
        records, source = by_split["train"], f"manifest {d.manifests['train']}"
    else:
        from ltdist.data.demo import DemoConfig

        demo = DemoConfig()
        return PlanResult(
            path,
            "stag",
            shape,
            f"  data               the demo generator's {demo.num_train} training images "
            "(build the demo data for a full plan)",
        )
    if cfg.limit:
        records = records[: cfg.limit]
    tail = sum(1 for r in records if any(space.is_tail(i) for i in r.label_ids))
    to_describe = len(records) if cfg.describe == "all" else tail
    from ltdist.stag.config import StagError
    from ltdist.stag.ray_pool import plan_actors  # the pool's own sizing (Ray loads lazily)

    tp = cfg.engine.tensor_parallel_size
    try:
        actors, per_actor = plan_actors(cfg, {"GPU": shape.world_size})
    except StagError as e:
        actors, per_actor = cfg.num_actors, cfg.num_gpus_per_actor
        problems.append(Problem("num_actors", str(e), "0"))
    if per_actor and shape.gpus_per_node % math.ceil(per_actor):
        problems.append(
            Problem(
                "engine.tensor_parallel_size",
                f"{per_actor} GPUs per actor do not divide a node's {shape.gpus_per_node} GPUs",
                str(math.gcd(int(per_actor), shape.gpus_per_node)),
            )
        )
    if cfg.engine.max_model_len and cfg.engine.max_model_len < cfg.engine.max_tokens + 256:
        problems.append(
            Problem(
                "engine.max_model_len",
                f"{cfg.engine.max_model_len} leaves no room for a ~256-token prompt and "
                f"max_tokens={cfg.engine.max_tokens}",
                str(cfg.engine.max_tokens + 512),
            )
        )
    rows = [
        ("data", source),
        ("training images", f"{len(records)} ({tail} with a tail label)"),
        ("to describe", f"{to_describe} (describe: {cfg.describe})"),
        ("engine", f"{cfg.engine.kind} {cfg.engine.model}"),
        ("actors", f"{actors} x {per_actor:g} GPUs (tensor parallel {tp})"),
        (
            "requests",
            f"{to_describe} to {to_describe * cfg.max_attempts} "
            f"(up to {cfg.max_attempts} attempts)",
        ),
        (
            "tokens generated",
            f"at most {to_describe * cfg.max_attempts * cfg.engine.max_tokens:,}"
            f" ({cfg.engine.max_tokens} per request)",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    table = "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
    return PlanResult(path, "stag", shape, table, [], problems)


def shipped_configs(root: str = "configs") -> list[str]:
    """Every STAG, pretraining and fine-tuning config the project ships."""
    out = []
    for sub in ("stag", "pretrain", "finetune"):
        folder = os.path.join(root, sub)
        out += sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".yaml"))
    return out
