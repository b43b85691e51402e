"""The rehearsal's STAG run: a STAG config through ``python -m ltdist.stag_gen`` here.

The config is the user's with the LLM replaced by the small real one that setup prepares
(SmolLM2-135M-Instruct: a tiny LLM where it says Llama-3.1-8B), the actor pool sized for this
machine's CPU, and the first ``LIMIT`` training records (key order) on stand-in images at the
split files' own names; its prompt, validation, constraints, retries and fallback are the
config's. The job runs on a local Ray cluster with vLLM's CPU build, is SIGKILLed (the whole
process tree: driver, raylet, actors) after its first shard and resumed by the same command;
the report must account for every record, and every key must be written exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ltdist.config import load_config
from ltdist.rehearsal.run import ROOT, Override, RehearsalResult, kill_when, render_run
from ltdist.rehearsal.standin import standin_image

LIMIT = 12  # training records described
SAMPLES_PER_SHARD = 4  # three shards: one to kill after, two to resume
TEST_IMAGES = 8  # stand-in images of the plainly packed test split (the rest are rejected)
SMALL_LLM = ROOT / ".cache" / "llm" / "SmolLM2-135M-Instruct"


@dataclass
class StagRunResult(RehearsalResult):
    killed_after_shards: int = 0
    counts: dict = field(default_factory=dict)
    num_written: int = 0
    valid_share: float | None = None

    def render(self) -> str:
        valid = "-" if self.valid_share is None else f"{100 * self.valid_share:.0f}%"
        facts = [
            f"killed after {self.killed_after_shards} shard(s), resumed; {self.num_written} of "
            f"{LIMIT} written, counts {self.counts}, valid {valid}"
        ]
        head = f"{self.config}: rehearsal run (local Ray, vLLM CPU build, {LIMIT} records)"
        return render_run(head, self.overrides, facts, self.seconds, self.problems)


def generation_python() -> str:
    """An interpreter with vLLM: this one, else the project's generation environment."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    gen = ROOT / ".venvs" / "gen" / "bin" / "python"
    if gen.is_file():
        return str(gen)
    raise FileNotFoundError(
        "a STAG rehearsal needs vLLM: run it from the generation environment, or run "
        "`make setup` (it builds .venvs/gen)"
    )


def shrink_stag(cfg, out: str, data: list[Override]) -> list[Override]:
    """The overrides that run a STAG config here (``data``: where its stand-in inputs are),
    each with its reason."""
    if not SMALL_LLM.is_dir():
        raise FileNotFoundError(f"{SMALL_LLM} is missing: `make setup` prepares it")
    e = cfg.engine
    return [
        Override("engine.kind", "vllm", f"was {e.kind}"),
        Override("engine.model", str(SMALL_LLM), f"a small real LLM (was {e.model})"),
        Override("engine.dtype", "auto", f"CPU (was {e.dtype})"),
        Override("engine.enforce_eager", "true", "no torch.compile on CPU"),
        Override("engine.tensor_parallel_size", "1", f"was {e.tensor_parallel_size}"),
        Override("num_actors", "1", "one CPU engine"),
        Override("num_gpus_per_actor", "0", "no GPU here"),
        Override("num_cpus_per_actor", "0.5", "a whole CPU per actor starves reads on 2 cores"),
        Override("env.VLLM_CPU_KVCACHE_SPACE", "1", "GiB of KV cache"),
        Override("env.VLLM_CPU_NUM_OF_RESERVED_CPU", "0", ""),
        Override("env.VLLM_ENABLE_V1_MULTIPROCESSING", "0", "the engine core in the actor"),
        Override("limit", str(LIMIT), "the first training records (key order)"),
        Override("data.samples_per_shard", str(SAMPLES_PER_SHARD), "shards to kill between"),
        Override(
            "batch_size", str(SAMPLES_PER_SHARD), f"a shard per engine call (was {cfg.batch_size})"
        ),
        Override("data.out", out, ""),
        Override("data.policy", "skip", "records without a stand-in image are listed"),
        *data,
        Override("progress", "false", ""),
    ]


def rehearse_stag_run(
    path: str, root: str, splits_dir: str, overrides: list[str] = (), timeout_s: int = 900
) -> StagRunResult:
    from ltdist.stag.pipeline import REPORT_FILE, StagConfig

    started = time.perf_counter()
    cfg = load_config(StagConfig, path, list(overrides))
    work = os.path.join(root, f"stag_{Path(path).stem}")
    shutil.rmtree(work, ignore_errors=True)  # a rehearsal starts from nothing
    out = os.path.join(work, "out")
    shrunk = shrink_stag(cfg, out, _standin_inputs(cfg, work, splits_dir))
    result = StagRunResult(path, shrunk)
    cmd = [
        generation_python(),
        "-m",
        "ltdist.stag_gen",
        "--config",
        path,
        *overrides,
        *(o.arg for o in shrunk),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    result.killed_after_shards = _run_and_kill(
        cmd, env, os.path.join(out, "train.index.json"), timeout_s
    )
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        result.problems.append(f"the resumed job exited {proc.returncode}: {proc.stderr[-2000:]}")
        return result
    report = json.loads(Path(out, REPORT_FILE).read_text())
    result.counts = report.get("counts", {})
    result.num_written = report["num_written"]
    quality = report.get("quality", {})
    if "fallback" in quality:  # the share of described samples that kept a valid description
        result.valid_share = 1.0 - quality["fallback"]
    accounted = report["num_written"] + report["num_rejected"]
    if report["num_input"] != LIMIT or accounted != LIMIT or not report["complete"]:
        result.problems.append(
            f"the report accounts for {accounted} of {LIMIT} records "
            f"(input {report['num_input']}, complete {report['complete']})"
        )
    keys = _train_keys(out)
    if len(keys) != len(set(keys)) or len(keys) != report["num_written"]:
        result.problems.append(f"{len(keys)} keys in the shards, {len(set(keys))} distinct")
    result.seconds = time.perf_counter() - started
    return result


def _standin_inputs(cfg, work: str, splits_dir: str) -> list[Override]:
    """Stand-in inputs for the records the run reads, as the overrides that point at them."""
    d = cfg.data
    if d.source == "benchmark":
        from ltdist.data.splits import load_split_records

        image_root = os.path.join(work, "images")
        for split, count in (("train", LIMIT), ("test", TEST_IMAGES)):
            records = load_split_records(d.benchmark, splits_dir, split, image_root)
            for r in sorted(records, key=lambda r: r.key)[:count]:
                os.makedirs(os.path.dirname(r.image), exist_ok=True)
                Path(r.image).write_bytes(standin_image(r.key, r.label_ids, 96))
        return [
            Override("data.image_root", image_root, "stand-in images at the split files' names"),
            Override("data.splits_dir", splits_dir, ""),
        ]
    from ltdist.data.demo import build_demo
    from ltdist.rehearsal.standin import small_demo_config

    data = os.path.join(work, "demo")
    build_demo(data, small_demo_config())
    classes = os.path.join(data, "classes.txt")
    if d.space_from == "classes":  # a given label space (the corpus: the benchmark's)
        from ltdist.data.manifest import read_class_names, read_manifest
        from ltdist.labels import LabelSpace

        names = read_class_names(classes)
        train = read_manifest(os.path.join(data, "train.jsonl"), names).records
        classes = os.path.join(data, "classes.json")
        LabelSpace.from_label_sets(names, (r.label_ids for r in train)).save(classes)
    return [
        Override("data.classes", classes, "a small demo set"),
        Override("data.manifests.train", os.path.join(data, "train.jsonl"), ""),
        Override("data.manifests.test", os.path.join(data, "test.jsonl"), ""),
    ]


def _run_and_kill(cmd: list[str], env: dict, index: str, timeout_s: int) -> int:
    """Kill the job once its index lists a shard; how many shards it left."""
    kill_when(cmd, env, lambda: _shards_done(index) > 0, "its first shard", timeout_s)
    return _shards_done(index)


def _shards_done(index: str) -> int:
    try:
        return len(json.loads(Path(index).read_text())["shards"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _train_keys(out: str) -> list[str]:
    from ltdist.data.shards import load_index, read_shard

    keys = []
    for info in load_index(out, "train").ordered():
        keys += [s.key for s in read_shard(os.path.join(out, info.name))]
    return keys
