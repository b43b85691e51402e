"""The Ray side of STAG: a fixed pool of engine actors behind Ray Data's ``map_batches``.

Only this STAG module uses Ray, and it imports Ray inside the functions that need it, so the
rest of the package (and this module) imports in either environment. Each actor builds its
engine once (start-up is expensive) and runs a :class:`~ltdist.stag.describe.Describer` on
batch after batch; results come back in no order (``publish.Collector`` matches them to
the input rows). A batch whose engine makes no progress ends its actor, and a batch that
keeps failing is given up (``ltdist.stag.watchdog``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ltdist.config import from_dict, to_dict
from ltdist.labels import LabelSpace
from ltdist.stag.config import StagConfig, StagError
from ltdist.stag.describe import Describer, RowResult, make_engine
from ltdist.stag.report import RunStats
from ltdist.stag.watchdog import (
    HUNG,
    STALL_EXIT_CODE,
    TEST_HANG_ENV,
    BatchLedger,
    HangForTest,
    Watchdog,
)

log = logging.getLogger(__name__)

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

    With a ``ledger`` (the run's :class:`BatchLedger` actor) every batch is registered before
    it goes to the engine; one given up comes back as ``hung`` rows without being tried, and
    with ``engine.stall_timeout_s`` a :class:`Watchdog` ends the actor when its batch stalls.
    """

    def __init__(self, cfg: dict, space: dict, ledger: Any = None):
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
        engine = make_engine(self.cfg)
        self.ledger, self.watchdog = ledger, None
        if ledger is not None and self.cfg.engine.stall_timeout_s > 0:
            self.watchdog = Watchdog(self.cfg.engine.stall_timeout_s, self._stalled)
            engine.on_progress = self.watchdog.progress
        if os.environ.get(TEST_HANG_ENV):
            engine = HangForTest(engine, os.environ[TEST_HANG_ENV])
        self.describer = Describer(self.cfg, self.space, engine)
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
        results = self._describe(rows)
        out: dict[str, list] = {c: [getattr(r, c) for r in results] for c in _OUT_COLUMNS}
        out["result"] = [json.dumps({c: getattr(r, c) for c in _JSON_COLUMNS}) for r in results]
        out["worker"] = [self.worker] * len(results)
        return out

    def _describe(self, rows: list[dict]) -> list[RowResult]:
        import ray

        if self.ledger is None:
            return self.describer.describe(rows)
        keys = [r["key"] for r in rows]
        retries = self.cfg.engine.batch_retries
        if not ray.get(self.ledger.begin.remote(keys, json.loads(self.worker), retries)):
            log.error(
                "batch of %d rows (%s ... %s) given up: %d tries stalled or died; its rows "
                "are reported as '%s'",
                len(keys),
                keys[0],
                keys[-1],
                retries + 1,
                HUNG,
            )
            reason = f"engine_stalled: {retries + 1} tries of its batch stalled or died"
            return [
                RowResult(r["key"], int(r["shard"]), status=HUNG, reasons=[reason]) for r in rows
            ]
        if self.watchdog is None:
            results = self.describer.describe(rows)
        else:
            with self.watchdog.watch(keys):
                results = self.describer.describe(rows)
        ray.get(self.ledger.finish.remote(keys))
        return results

    def _stalled(self, seen: dict) -> None:
        """The watchdog's verdict: say what was seen, record it, and end this process so that
        Ray restarts the actor and retries the batch (``os._exit``: the engine may be wedged
        in a call that never returns, and a clean shutdown could wait on it)."""
        import ray

        log.error(
            "engine stalled: no progress for %.0f s (engine.stall_timeout_s=%g) on a batch of "
            "%d rows (%s ... %s) after %.0f s and %d progress units; ending actor %s so that "
            "Ray restarts it and retries the batch",
            seen["seconds_without_progress"],
            self.cfg.engine.stall_timeout_s,
            len(seen["keys"]),
            seen["keys"][0],
            seen["keys"][-1],
            seen["batch_seconds"],
            seen["progress"],
            self.worker,
        )
        try:
            ray.get(self.ledger.stalled.remote(seen), timeout=30)
        except Exception:  # the restart matters more than the record
            log.exception("could not record the stall")
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(STALL_EXIT_CODE)


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


def _model_is_local(model: str) -> bool:
    return model.startswith((".", "/", "~")) or Path(model).exists()


def actor_config(cfg: StagConfig) -> dict:
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


def describe_on_ray(
    cfg: StagConfig, space: LabelSpace, rows: list[dict], stats: RunStats
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
        # the run's batch ledger (module doc of ltdist.stag.watchdog); dies with the driver
        ledger = ray.remote(num_cpus=0)(BatchLedger).remote()
        ds = ray.data.from_items(
            rows, override_num_blocks=max(1, math.ceil(len(rows) / cfg.batch_size))
        ).map_batches(
            GenerateActor,
            fn_constructor_kwargs={
                "cfg": actor_config(cfg),
                "space": space.to_dict(),
                "ledger": ledger,
            },
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            batch_size=cfg.batch_size,
            batch_format="numpy",
            **remote_args,
        )
        # prefetch_batches=0: a finished batch is handed over at once (with prefetching, Ray
        # Data holds it back until the next one is ready, which delays publishing shards)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
                yield list(_result_rows(batch))
        finally:
            try:
                stats.engine_stalls = ray.get(ledger.summary.remote(), timeout=60)
            except Exception:  # (the cluster may be gone) the run's own error matters more
                log.exception("could not read the batch ledger")
    finally:
        if connected:
            ray.shutdown()
