"""Checkpoint selection (``checkpoint.select``): the best periodically evaluated weights.

``<output_dir>/best/step-00000120/`` is an export folder (:mod:`ltdist.train.export`) of the
weights a periodic evaluation scored (EMA weights when EMA is on), and ``best/BEST.json``
names it with its selection mAP. The pointer is replaced only once the new folder is
complete and the old folder is removed after, so a run killed at any moment leaves a pointer to
a complete export; a resumed run reads the pointer and keeps comparing against it. A best
written after the checkpoint the run resumes from (steps it then trains again) stands: it was
evaluated like any other candidate, and an exact resume scores the same weights again.
"""

from __future__ import annotations

import json
import math
import re

from ltdist import storage
from ltdist.train.checkpoint import step_dir_name
from ltdist.train.export import save_export

POINTER = "BEST.json"
_STEP_DIR = re.compile(r"^step-\d{8}$")


class BestWeights:
    """The best weights so far on ``split`` under ``root`` (mAP over all classes, higher wins;
    a tie keeps the earlier step)."""

    def __init__(self, root: str, selection: str, split: str):
        self.root, self.selection, self.split = root, selection, split
        self.step: int | None = None
        self.map: float = -math.inf

    @property
    def folder(self) -> str:
        assert self.step is not None
        return storage.join(self.root, step_dir_name(self.step))

    def record(self) -> dict | None:
        """What the report says about the selection (None before any candidate)."""
        if self.step is None:
            return None
        return {"by": self.selection, "split": self.split, "step": self.step, "map": self.map}

    def load(self) -> None:
        """Continue from the pointer a killed run left (nothing when there is none)."""
        path = storage.join(self.root, POINTER)
        if not storage.exists(path):
            return
        data = json.loads(storage.read_bytes(path))
        if data["split"] != self.split:
            raise ValueError(
                f"{path} selected on split {data['split']!r}, this run selects on "
                f"{self.split!r}: use another output_dir"
            )
        self.step, self.map = int(data["step"]), float(data["map"])

    def clear(self, acc) -> None:
        """A fresh run starts with no best (main process; a previous run's folder goes)."""
        if acc.is_main_process and storage.exists(self.root):
            storage.remove_tree(self.root)
        acc.wait_for_everyone()

    def offer(self, acc, step: int, score: float | None, state, space, cfg, meta: dict) -> bool:
        """Keep the weights ``state()`` returns when ``score`` beats the best so far. Every
        rank calls this with the same score (the gathered evaluation): ``state`` may gather
        across ranks; the main process writes."""
        if score is None or not math.isfinite(score) or score <= self.map:
            return False
        weights = state()
        record = {"by": self.selection, "split": self.split, "step": step, "map": float(score)}
        if acc.is_main_process:
            meta = {**meta, "step": step, "selection": record}
            save_export(storage.join(self.root, step_dir_name(step)), weights, space, cfg, meta)
            storage.write_bytes_atomic(
                storage.join(self.root, POINTER), json.dumps(record, indent=1).encode()
            )
            for name in storage.listdir(self.root):
                if _STEP_DIR.match(name) and name != step_dir_name(step):
                    storage.remove_tree(storage.join(self.root, name))
        acc.wait_for_everyone()
        self.step, self.map = step, float(score)
        return True
