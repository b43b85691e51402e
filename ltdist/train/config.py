"""The training config: one dataclass tree for pretraining and fine-tuning, loaded from YAML.

``task`` picks the loss (DP-VLPA phase 1, or phase 2 with the DP-VLPA or the CPRFL head; the
``cprfl`` task also trains the linear ERM baseline, ``model.head=linear``); everything else
(data, loader, optimiser, precision, checkpoints) is shared by the one loop in
:mod:`ltdist.train.loop`. Batch size and precision are owned here; the DeepSpeed JSON says
``"auto"`` for them and Accelerate fills them in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ltdist.data.loader import LoaderConfig
from ltdist.eval.metrics import Scoring
from ltdist.losses.multilabel import LossConfig
from ltdist.models.backbones import BackboneConfig
from ltdist.models.clip import ClipTowerConfig
from ltdist.models.cprfl import CPRFLConfig
from ltdist.models.dpvlpa import DPVLPAConfig
from ltdist.models.qformer import QFormerConfig
from ltdist.train.optim import OptimConfig
from ltdist.train.plan import ClusterConfig

Task = Literal["pretrain", "dpvlpa", "cprfl"]
# Accelerate's trackers (ltdist.train.tracking says where each one writes).
Tracker = Literal[
    "tensorboard",
    "wandb",
    "mlflow",
    "comet_ml",
    "aim",
    "clearml",
    "dvclive",
    "swanlab",
    "trackio",
    "none",
]


@dataclass
class DataConfig:
    location: str = ""  # a shard folder (local or s3:// / gs://); required
    # The data set the shards hold (coco_lt, voc_lt, demo; "" = other): `ltdist rehearse`
    # sizes its plan from the split files before the shards exist.
    dataset: str = ""
    # The training split's size for that plan when it is not the split file's (the pretraining
    # corpus: COCO images with COCO-LT's labels); 0 = the split file's. The index wins once the
    # shards exist.
    planned_train_samples: int = 0
    train_split: str = "train"
    eval_split: str = "test"  # periodic and final mAP; "" = no evaluation
    val_split: str = ""  # picks per-class F1 thresholds; "" = a global threshold of 0.5
    eval_batch_size: int = 64
    eval_limit: int = 0  # evaluate on the first N samples only (periodic checks); 0 = all
    # The learnability control: each batch's label rows permuted across its images.
    shuffle_labels: bool = False
    # Train on the frozen token source's tokens, computed once (ltdist.train.token_cache), not
    # on the images: DP-VLPA's image tower; task=cprfl's CLIP tower (model.clip.freeze_image)
    # or Q-Former tokens (model.backbone.freeze). A token cache folder, or "auto"
    # (<location>/tokens); "" = images. A cache that is missing or partial is built first
    # (every rank its shards); one built for another source, weights, tag, size,
    # preprocessing or dtype is refused, naming the field. Evaluation during training then
    # reads caches of data.eval_split / data.val_split (one deterministic view) too.
    token_cache: str = ""
    token_cache_dtype: Literal["bf16", "fp16"] = "bf16"
    # Views per image: 1 = the deterministic transform (loader.augment=false); K > 1 = the
    # augmentations of epochs 0..K-1 (loader.augment=true), epoch e reading view e % K.
    token_cache_views: int = 1


@dataclass
class EvalConfig:
    # What AP ranks (docs/method.md, Evaluation): "sigmoid" = each class's sigmoid
    # probabilities; "softmax" = a softmax over each image's classes first (LMPT's protocol,
    # which DP-VLPA says it follows). F1 and thresholds use the sigmoid probabilities always.
    scoring: Scoring = "sigmoid"


@dataclass
class ModelConfig:
    clip: ClipTowerConfig = field(default_factory=ClipTowerConfig)
    # The Q-Former; its vision_width follows the CLIP image tower.
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    # The Q-Former's BERT tokenizer: a Hugging Face id or folder ("pkg:<module>/<path>" for a
    # folder inside an installed package).
    text_tokenizer: str = "bert-base-uncased"
    max_text_tokens: int = 128  # 50-80 word descriptions take ~100 BERT tokens
    dpvlpa: DPVLPAConfig = field(default_factory=DPVLPAConfig)
    cprfl: CPRFLConfig = field(default_factory=CPRFLConfig)
    # The cprfl task's head: "cprfl" (category prompts, ``cprfl`` above) or "linear" (the ERM
    # baseline: pool the backbone tokens, Linear to the classes; no text side).
    head: Literal["cprfl", "linear"] = "cprfl"
    linear_pool: Literal["mean", "cls"] = "mean"  # head=linear; "cls" (token 0): backbone clip
    # CPRFL's visual tokens: resnet101 | clip | qformer (the Q-Former of ``init_from``).
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    class_template: str = "a photo of a {}."
    # An exported checkpoint (a folder or .safetensors file) to start from, e.g. pretraining's
    # export for phase 2; its CLIP and Q-Former settings replace the ones here.
    init_from: str = ""


@dataclass
class CheckpointConfig:
    dir: str = ""  # "" = <output_dir>/checkpoints; local or s3:// / gs://
    every_steps: int = 0  # 0 = only at the end (and on preemption)
    keep_last: int = 2
    resume: bool = True  # continue from the latest complete checkpoint in dir
    staging_dir: str = ""  # local scratch for object-store checkpoints; "" = a temp folder
    # Resuming unpickles Accelerate / DeepSpeed files: only from checkpoints this run wrote,
    # unless this says the location is trusted (ltdist.train.checkpoint).
    trusted: bool = False
    # Which weights the final evaluation and the export hold (docs/method.md, Evaluation):
    # "last" = the run's final ones; "val" = the best periodic evaluation's on
    # data.val_split; "test" = the best on data.eval_split (the papers' practice, optimistic:
    # the reported number picked its own weights).
    select: Literal["last", "val", "test"] = "last"


@dataclass
class TrainConfig:
    task: Task = "pretrain"
    output_dir: str = "runs/train"
    # The cluster shape the config is written for, and its rescaling rule (ltdist.train.plan).
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = epochs x steps per epoch
    mixed_precision: Literal["no", "bf16", "fp16"] = "bf16"
    ema_decay: float = 0.0  # 0 = off; CPRFL uses 0.998
    eval_every_steps: int = 0  # 0 = only at the end
    log_every_steps: int = 10
    tracker: Tracker = "tensorboard"
    # The tracker's project (W&B project, MLflow experiment, TensorBoard subfolder); the run is
    # named after output_dir's last folder unless tracker_init_kwargs names it.
    tracker_project: str = "ltdist"
    # Keyword arguments for the tracker's start, keyed by tracker as Accelerate's init_kwargs
    # (e.g. {"wandb": {"entity": "lab", "tags": ["coco"]}, "mlflow": {"run_name": "x"}}).
    tracker_init_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # A file whose appearance asks the run to checkpoint and stop (SLURM's pre-timeout signal
    # touches it); SIGUSR1 / SIGTERM to a training process do the same.
    preempt_file: str = ""
    audit_batches: bool = False  # each rank logs its batches' keys to <output_dir>/batches/
    collective_timeout_s: int = 1800
    # A non-finite loss or gradient norm stops the run at its step, naming the value; up to
    # this many such steps are skipped first (their update is dropped). fp16's loss scaler
    # skips its own overflowed steps; they do not count here.
    max_nonfinite_steps: int = 0
    seed: int = 0
    threads: int = 0  # torch intra-op threads per process; 0 = torch's default
    # One device's dense peak TFLOP/s for MFU; 0 = from the GPU's name and the run's precision
    # (ltdist.train.flops.PEAKS). Set it for a GPU the table lacks, or for a CPU.
    peak_tflops: float = 0.0
    progress: bool = True

    def validate(self) -> None:
        counts = {
            "data.eval_batch_size": (self.data.eval_batch_size, 1),
            "data.eval_limit": (self.data.eval_limit, 0),
            "epochs": (self.epochs, 0),
            "max_steps": (self.max_steps, 0),
            "eval_every_steps": (self.eval_every_steps, 0),
            "log_every_steps": (self.log_every_steps, 1),
            "checkpoint.every_steps": (self.checkpoint.every_steps, 0),
            "collective_timeout_s": (self.collective_timeout_s, 1),
            "threads": (self.threads, 0),
            "max_nonfinite_steps": (self.max_nonfinite_steps, 0),
        }
        low = [f"{k}={v} (at least {least})" for k, (v, least) in counts.items() if v < least]
        if low:
            raise ValueError(f"out of range: {', '.join(low)}")
        clip = self.model.clip
        builds_clip_tower = self.task in ("pretrain", "dpvlpa") or (
            self.model.backbone.kind in ("clip", "qformer")
        )
        if (
            builds_clip_tower
            and not self.model.init_from
            and (self.loader.image_size != clip.image_size)
        ):
            raise ValueError(
                f"loader.image_size={self.loader.image_size} but model.clip.image_size="
                f"{clip.image_size}: the CLIP tower's position embeddings are built for the "
                "latter; set both to the same size"
            )
        if builds_clip_tower:
            clip.validate()
        if self.task == "cprfl" and self.model.backbone.kind == "clip":
            self.model.backbone.clip.validate()
        if self.peak_tflops < 0:
            raise ValueError(f"peak_tflops must be >= 0 (0: the device's), got {self.peak_tflops}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not self.data.location:
            raise ValueError(
                "data.location is not set: the shard folder to train on (for example "
                "data.location=shards/demo); a run never falls back to another data set"
            )
        if self.epochs < 1 and self.max_steps < 1:
            raise ValueError("set epochs >= 1 or max_steps >= 1")
        select = self.checkpoint.select
        if select == "val" and not self.data.val_split:
            raise ValueError(
                "checkpoint.select=val picks the best weights on the validation split, but "
                "data.val_split is not set (pack.val_fraction carves one from train)"
            )
        if select == "test" and not self.data.eval_split:
            raise ValueError("checkpoint.select=test needs data.eval_split (the test split)")
        if select != "last" and not self.eval_every_steps:
            raise ValueError(
                f"checkpoint.select={select} picks among the periodic evaluations, but "
                "eval_every_steps=0 (only at the end): set eval_every_steps"
            )
        if self.checkpoint.keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")
        if self.model.backbone.kind == "qformer" and not self.model.init_from:
            raise ValueError(
                "model.backbone.kind=qformer takes the Q-Former of a pretrained export: "
                "set model.init_from"
            )
        if self.model.backbone.freeze and not (
            self.task == "cprfl" and self.model.backbone.kind == "qformer"
        ):
            raise ValueError(
                "model.backbone.freeze freezes the Q-Former of task=cprfl with "
                "model.backbone.kind=qformer; a CLIP tower is frozen by model.clip.freeze_image"
            )
        if self.model.head != "cprfl" and self.task != "cprfl":
            raise ValueError(
                f"model.head={self.model.head} is a head of task=cprfl; task={self.task} has "
                "its own"
            )
        if self.model.linear_pool == "cls" and self.model.backbone.kind != "clip":
            raise ValueError(
                "model.linear_pool=cls takes a CLIP tower's class token: it needs "
                f"model.backbone.kind=clip (got {self.model.backbone.kind}); use mean pooling"
            )
        if self.data.token_cache:
            self._validate_token_cache()
        if self.task == "pretrain" and self.model.init_from:
            raise ValueError("pretraining starts from CLIP + BERT; model.init_from is for phase 2")
        stray = [k for k in self.tracker_init_kwargs if k != self.tracker]
        if stray:
            raise ValueError(
                f"tracker_init_kwargs has keys {stray} but tracker={self.tracker}: its keys name "
                "the tracker they are for"
            )
        if self.tracker != "none" and not self.tracker_project:
            raise ValueError(f"tracker={self.tracker} needs a tracker_project (its project name)")
        self.optim.validate()
        self.loader.validate()
        self.cluster.validate()

    def _validate_token_cache(self) -> None:
        """A cache holds the tokens of the task's frozen token source (DP-VLPA's CLIP tower;
        the cprfl task's CLIP tower or Q-Former tokens) for each image."""
        kind = self.model.backbone.kind
        if self.task == "cprfl" and kind == "resnet101":
            raise ValueError(
                "data.token_cache needs a frozen token source, but model.backbone.kind="
                "resnet101 trains its ResNet with the head: use kind=clip "
                "(model.clip.freeze_image=true) or kind=qformer with model.backbone.freeze=true"
            )
        if self.task == "cprfl" and kind == "qformer" and not self.model.backbone.freeze:
            raise ValueError(
                "data.token_cache needs a frozen token source, but model.backbone.kind=qformer "
                "trains its Q-Former: set model.backbone.freeze=true to freeze it (then only "
                "the projection and the head train)"
            )
        if not self.model.clip.freeze_image:
            raise ValueError(
                "data.token_cache needs a frozen image tower: model.clip.freeze_image=false "
                "trains it, so its tokens change every step"
            )
        views = self.data.token_cache_views
        if views < 1:
            raise ValueError(f"data.token_cache_views must be >= 1, got {views}")
        if self.loader.augment and views == 1:
            raise ValueError(
                "data.token_cache with one view holds the deterministic view of each image, but "
                "loader.augment=true draws a new crop and flip every epoch: set "
                "data.token_cache_views to the number of epochs (view e is epoch e's "
                "augmentation), or loader.augment=false"
            )
        if views > 1 and not self.loader.augment:
            raise ValueError(
                f"data.token_cache_views={views} caches augmented views, but loader.augment="
                "false: without augmentation every view is the same; set views to 1"
            )
