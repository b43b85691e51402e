"""The paths of a STAG run submitted with ``ray job submit --working-dir <dir>``.

Ray zips the working dir without its ``.gitignore``d paths (``data/``, ``shards/``, ``runs/``,
``.cache/``), unpacks it into a temporary folder on the head node and starts the job there; the
folder goes when Ray cleans it up. So a relative input is looked for in that copy, where a
data set usually is not, and a relative output would be written into it and lost. In such a
job, inputs that the copy lacks and every relative output are refused before anything runs,
naming the key and what to write instead: an absolute path on a file system the nodes share,
or a URL (``s3://``, ``gs://``, ...) where the key is read or written through fsspec.

Outside such a job (a plain run, or a job without ``--working-dir`` that runs where its
entrypoint ``cd``s to), relative paths mean what they always meant.
"""

from __future__ import annotations

import json
import os

from ltdist import storage
from ltdist.stag.config import StagConfig, StagError

# The job's config, which Ray's job supervisor hands its driver (entrypoint) process as JSON:
# {"runtime_env": {"working_dir": "gcs://_ray_pkg_<hash>.zip", ...}, "metadata": {...}}
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_working_dir() -> str | None:
    """The uploaded working_dir (its package URI) of the Ray job this process drives, or None
    when this is no Ray job or a job without a working_dir."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    working_dir = runtime_env.get("working_dir") if isinstance(runtime_env, dict) else None
    return str(working_dir) if working_dir else None


def _relative(location: str) -> bool:
    return storage.is_local(location) and not os.path.isabs(storage.local_path(location))


def _url_keys(cfg: StagConfig) -> set[str]:
    """The keys whose locations may be URLs (read or written through ltdist.storage); manifests,
    classes.txt, a model folder and the request log are local files."""
    keys = {"data.out", "data.splits_dir"}
    if cfg.data.source == "benchmark":
        keys.add("data.image_root")
    return keys


def _inputs(cfg: StagConfig) -> dict[str, str]:
    """Config key -> location of every file or folder the run reads (set ones only)."""
    data = cfg.data
    found: dict[str, str] = {}
    if data.source == "manifest":
        found["data.classes"] = data.classes
        found.update({f"data.manifests.{s}": p for s, p in data.manifests.items()})
    else:
        found["data.splits_dir"] = data.splits_dir
    if data.image_root:
        found["data.image_root"] = data.image_root
    # a local model folder; anything else is a Hugging Face id, resolved by the hub or its cache
    if cfg.engine.kind != "template" and cfg.engine.model.startswith("."):
        found["engine.model"] = cfg.engine.model
    return {k: v for k, v in found.items() if v}


def _outputs(cfg: StagConfig) -> dict[str, str]:
    found = {"data.out": cfg.data.out, "record_requests": cfg.record_requests}
    return {k: v for k, v in found.items() if v}


def check_job_paths(cfg: StagConfig) -> None:
    """In a Ray job with an uploaded working_dir: refuse relative outputs and relative inputs
    that are not in the uploaded copy (one error naming every such key). Otherwise nothing."""
    working_dir = job_working_dir()
    if working_dir is None:
        return
    here, urls = os.getcwd(), _url_keys(cfg)

    def instead(key: str) -> str:
        url = " or a URL such as s3://<bucket>/<prefix>" if key in urls else ""
        return f"Write {key}=<an absolute path on a file system the nodes share>{url}"

    problems = [
        f"{key}={value}: a relative output would be written into the copy and lost. " + instead(key)
        for key, value in _outputs(cfg).items()
        if _relative(value)
    ]
    problems += [
        f"{key}={value}: not in the copy. " + instead(key)
        for key, value in _inputs(cfg).items()
        if _relative(value) and not storage.exists(value)
    ]
    if problems:
        raise StagError(
            f"this Ray job was submitted with a working_dir ({working_dir}): it runs in Ray's "
            f"temporary copy of that folder on the head node ({here}), which Ray deletes "
            "afterwards and which lacks the .gitignored paths (data/, shards/, runs/, .cache/): "
            "Ray does not upload them.\n  " + "\n  ".join(problems)
        )


def missing_config_hint(path: str) -> str:
    """Why a relative ``--config`` file is missing in a Ray job with a working_dir ("" when
    that does not apply)."""
    if job_working_dir() is None or os.path.isabs(path) or os.path.exists(path):
        return ""
    return (
        f"--config {path} is not in the job's working dir ({os.getcwd()}, Ray's copy of "
        "--working-dir): Ray does not upload .gitignored paths. Put the config beside the "
        "tracked ones (configs/stag/) or give an absolute path the head node sees"
    )
