"""Experiment trackers: any tracker Accelerate integrates (``tracker`` in the training config),
with its files under the run's folder and no network unless the user configured one.

Where each one writes by default (``<dir>`` = the run's ``output_dir``, or a local temporary
folder when that is an object store):

- tensorboard: ``<dir>/tb/<project>/``
- wandb: ``<dir>/wandb/offline-run-*/`` in offline mode, unless ``WANDB_MODE`` (or
  ``tracker_init_kwargs.wandb.mode``) says otherwise; ``wandb sync`` uploads it later
- mlflow: a local SQLite store ``<dir>/mlflow/mlflow.db`` (artifacts beside it) unless
  ``MLFLOW_TRACKING_URI`` names a server or store
- the others (aim, comet_ml, clearml, dvclive, ...): ``<dir>/<tracker>/`` where the tracker takes
  a folder; their own settings (environment, config files) decide the rest
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ltdist.config import to_dict
from ltdist.train.accel import TrainingError
from ltdist.train.config import TrainConfig


@dataclass
class Tracking:
    """What Accelerate is given: the tracker (None = none), its folder, the project name (W&B's
    project, MLflow's experiment, TensorBoard's subfolder) and ``init_trackers``' init_kwargs."""

    log_with: str | None
    logging_dir: str
    project: str
    init_kwargs: dict = field(default_factory=dict)
    mlflow_uri: str = ""  # the local store set before MLflow starts; "" = the user's


def plan_tracking(cfg: TrainConfig, local_dir: str) -> Tracking:
    """The tracker as configured, checked against the installed Accelerate and packages, with
    the defaults that keep its files under ``local_dir`` and off the network."""
    name = cfg.tracker
    if name == "none":
        return Tracking(None, local_dir, cfg.tracker_project)
    _check_available(name)
    folder = os.path.join(local_dir, "tb" if name == "tensorboard" else name)
    kwargs = {k: dict(v) for k, v in cfg.tracker_init_kwargs.items()}
    own = kwargs.setdefault(name, {})
    run_name = os.path.basename(os.path.normpath(cfg.output_dir)) or "run"
    mlflow_uri = ""
    if name == "wandb":
        own.setdefault("name", run_name)
        if "WANDB_DIR" not in os.environ:
            own.setdefault("dir", local_dir)
        if "WANDB_MODE" not in os.environ:
            own.setdefault("mode", "offline")
    elif name == "mlflow":
        own.setdefault("run_name", run_name)
        own.setdefault("logging_dir", os.path.join(os.path.abspath(folder), "artifacts"))
        if "MLFLOW_TRACKING_URI" not in os.environ:
            mlflow_uri = "sqlite:///" + os.path.join(os.path.abspath(folder), "mlflow.db")
    return Tracking(name, folder, cfg.tracker_project, kwargs, mlflow_uri)


def start_tracking(acc, cfg: TrainConfig, tracking: Tracking) -> None:
    """Start the run in the tracker (main process) with the config as flat hyperparameters."""
    if tracking.log_with is None:
        return
    if acc.is_main_process:
        os.makedirs(tracking.logging_dir, exist_ok=True)
        if tracking.mlflow_uri:
            import mlflow

            mlflow.set_tracking_uri(tracking.mlflow_uri)
    acc.init_trackers(tracking.project, config=hparams(cfg), init_kwargs=tracking.init_kwargs)
    where = tracking.mlflow_uri or tracking.init_kwargs.get("wandb", {}).get("dir")
    acc.print(f"{tracking.log_with}: logging to {where or tracking.logging_dir}")


def hparams(cfg: TrainConfig) -> dict:
    """The config as flat scalars (``model.clip.name``: str, int, float or bool), which every
    tracker accepts: lists become comma-joined text, None is left out, and the tracker's own
    init kwargs (which may hold credentials) are not logged."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(value, (list, tuple)):
            if all(isinstance(v, (int, float, str, bool)) for v in value):
                flat[prefix.rstrip(".")] = ",".join(map(str, value))
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix.rstrip(".")] = value

    config = to_dict(cfg)
    config.pop("tracker_init_kwargs")
    walk("", config)
    return flat


def _check_available(name: str) -> None:
    """Accelerate drops a tracker whose package is missing without a word: refuse instead."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    if name not in LOGGER_TYPE_TO_CLASS:
        raise TrainingError(
            f"tracker={name}: the installed Accelerate does not know this tracker; it knows "
            f"{sorted(LOGGER_TYPE_TO_CLASS)} (or none)"
        )
    if name not in {str(t) for t in get_available_trackers()}:
        extra = " (pip install 'ltdist[trackers]')" if name in ("wandb", "mlflow") else ""
        raise TrainingError(
            f"tracker={name}: its package is not installed in this environment{extra}; or set "
            "tracker=tensorboard / tracker=none"
        )
