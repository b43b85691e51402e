"""Resumable training state: one folder per saved step, complete or absent.

``<root>/step-00000120/`` holds Accelerate's state (model, optimizer and per-process RNG
states; DeepSpeed's ZeRO folder under DeepSpeed), ``trainer.json`` (step, loader position,
scheduler, history, world size), ``ema.safetensors`` when EMA is on, the label space and the
config it was trained with (``classes.json``, ``config.json``), and ``COMPLETE``, written
last by the main process once every rank has saved: a folder without it is an interrupted save
and is ignored (and removed on the next save). The newest ``K`` complete folders are kept.

Trust: ``acc.load_state`` goes through ``torch.load`` and DeepSpeed's checkpoint engine loads
with ``weights_only=False``, which can unpickle code. So the root records who wrote it
(``OWNER.json``: the run's ``output_dir``), and resuming from a root another run wrote is refused
unless ``checkpoint.trusted`` says so; never point ``checkpoint.dir`` at files from elsewhere.

The root may be an object-store URL: every node saves into a local staging folder, its first
process uploads the node's files, and resume downloads the folder the same way. The extra
state is JSON and safetensors; only Accelerate / DeepSpeed's own resume files go through
``torch.load`` (the run's own output, not a hand-off: exports are safetensors only).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from ltdist import storage

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
COMPLETE = "COMPLETE"
OWNER = "OWNER.json"
TRAINER_STATE = "trainer.json"
EMA_FILE = "ema.safetensors"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_steps(root: str) -> list[int]:
    """Steps with a complete checkpoint under ``root``, ascending."""
    steps = []
    for name in storage.listdir(root):
        m = _STEP_DIR.match(name)
        if m and storage.exists(storage.join(root, name, COMPLETE)):
            steps.append(int(m.group(1)))
    return sorted(steps)


class Checkpointer:
    """Saves and restores the training state through an ``accelerate.Accelerator``."""

    def __init__(self, accelerator, root: str, keep_last: int = 2, staging_dir: str = ""):
        self.acc, self.root, self.keep_last = accelerator, root, keep_last
        self.remote = not storage.is_local(root)
        self._staging = staging_dir

    def _local(self, name: str) -> Path:
        if not self.remote:
            return Path(storage.local_path(storage.join(self.root, name)))
        staging = self._staging or os.path.join(
            tempfile.gettempdir(), f"ltdist-ckpt-staging-{os.getuid()}"
        )  # one folder per node: every process of the node derives the same path
        return Path(staging) / name

    def latest(self) -> int | None:
        steps = complete_steps(self.root)
        return steps[-1] if steps else None

    def check_owner(self, output_dir: str, trusted: bool = False) -> None:
        """Refuse to resume from checkpoints this run did not write (their resume files are
        unpickled), unless the user trusts them."""
        path = storage.join(self.root, OWNER)
        owner = json.loads(storage.read_bytes(path)) if storage.exists(path) else {}
        if owner.get("output_dir") == _normal(output_dir) or trusted:
            return
        if not owner and _normal(self.root) == _normal(storage.join(output_dir, "checkpoints")):
            log.warning(
                "%s records no writer (written before OWNER.json): resuming, as it is "
                "this run's own folder",
                self.root,
            )
            return
        wrote = f"were written by the run at {owner['output_dir']}" if owner else "record no run"
        raise PermissionError(
            f"the checkpoints under {self.root} {wrote}, not this one ({output_dir}). Resuming "
            "unpickles their optimizer and DeepSpeed files (torch.load, weights_only=False), "
            "which runs whatever code they hold: set checkpoint.trusted=true only for files you "
            "trust, or use another checkpoint.dir"
        )

    def claim(self, output_dir: str) -> None:
        """Record this run as the root's writer (main process, before its first save)."""
        path = storage.join(self.root, OWNER)
        if self.acc.is_main_process and not storage.exists(path):
            storage.makedirs(self.root)
            data = {"output_dir": _normal(output_dir)}
            storage.write_bytes_atomic(path, json.dumps(data).encode())

    # -- save -------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        trainer_state: dict,
        ema_state: dict | None = None,
        files: dict[str, bytes] | None = None,
    ) -> str:
        """Every process calls this at the same step; returns the checkpoint's location.
        ``files``: small extra files the main process writes (the label space, the config)."""
        acc, name = self.acc, step_dir_name(step)
        local = self._local(name)
        if acc.is_local_main_process and local.exists():
            shutil.rmtree(local)  # an interrupted save of the same step
        acc.wait_for_everyone()
        acc.save_state(str(local / "state"), safe_serialization=True)
        if acc.is_main_process:
            (local / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
            for file_name, data in (files or {}).items():
                (local / file_name).write_bytes(data)
            if ema_state is not None:
                from safetensors.torch import save_file

                save_file(ema_state, str(local / EMA_FILE))
        acc.wait_for_everyone()
        if self.remote and acc.is_local_main_process:
            storage.upload_tree(local, storage.join(self.root, name))
        acc.wait_for_everyone()
        location = storage.join(self.root, name)
        if acc.is_main_process:
            storage.write_bytes_atomic(storage.join(location, COMPLETE), b"")
            self._prune(keep=step)
        acc.wait_for_everyone()
        if self.remote and acc.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
        return location

    def _prune(self, keep: int) -> None:
        steps = complete_steps(self.root)
        for old in steps[: max(0, len(steps) - self.keep_last)]:
            if old != keep:
                storage.remove_tree(storage.join(self.root, step_dir_name(old)))
        # interrupted saves (no COMPLETE) older than this one
        for name in storage.listdir(self.root):
            m = _STEP_DIR.match(name)
            if m and int(m.group(1)) not in steps and int(m.group(1)) < keep:
                storage.remove_tree(storage.join(self.root, name))

    # -- load -------------------------------------------------------------------------------

    def read_trainer_state(self, step: int) -> dict:
        return json.loads(
            storage.read_bytes(storage.join(self.root, step_dir_name(step), TRAINER_STATE))
        )

    def load(self, step: int) -> tuple[dict, dict | None]:
        """Restore model, optimizer and RNG states; return (trainer state, EMA state)."""
        acc, name = self.acc, step_dir_name(step)
        local = self._local(name)
        if self.remote:
            if acc.is_local_main_process:
                storage.download_tree(storage.join(self.root, name), local)
            acc.wait_for_everyone()
        acc.load_state(str(local / "state"))
        trainer_state = json.loads((local / TRAINER_STATE).read_text())
        ema_state = None
        if (local / EMA_FILE).exists():
            from safetensors.torch import load_file

            ema_state = load_file(str(local / EMA_FILE))
        acc.wait_for_everyone()
        if self.remote and acc.is_local_main_process:
            shutil.rmtree(local, ignore_errors=True)
        return trainer_state, ema_state


def _normal(location: str) -> str:
    return os.path.abspath(location) if storage.is_local(location) else location.rstrip("/")
