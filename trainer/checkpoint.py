"""Checkpoints: atomic writes (temp file + rename), the last K kept, automatic resume.

A checkpoint is a `torch.save`d dict (docs/architecture.md): config, model, criterion, optimizer,
scheduler, epoch, step, batch_in_epoch, rng, mlflow_run_id, world_size. `epoch` / `batch_in_epoch` is the
data position where training continues: batches `batch_in_epoch..` of epoch `epoch`.

    ckpt = Checkpointer(run_dir / "checkpoints", keep_last=3)
    ckpt.save(state, step)          # rank 0 only
    state = ckpt.load_latest()      # None when there is none
"""
from __future__ import annotations

import os
import random
import re
import tempfile

import numpy as np
import torch

NAME = re.compile(r"^step-(\d{9})\.pt$")


class Checkpointer:
    def __init__(self, directory: str, keep_last: int = 3):
        self.dir = directory
        self.keep_last = keep_last

    def paths(self) -> list[str]:
        """Existing checkpoints, oldest first."""
        if not os.path.isdir(self.dir):
            return []
        return [os.path.join(self.dir, f) for f in sorted(os.listdir(self.dir)) if NAME.match(f)]

    def latest(self) -> str | None:
        paths = self.paths()
        return paths[-1] if paths else None

    def save(self, state: dict, step: int) -> str:
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"step-{step:09d}.pt")
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-", suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: a reader sees the old set or the new file, never half of it
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        for old in self.paths()[:-self.keep_last]:
            os.remove(old)
        return path

    def load_latest(self) -> dict | None:
        path = self.latest()
        return load(path) if path else None


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
