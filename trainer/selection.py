"""The best checkpoint by a validation metric: model selection on the val split (classes held out of training),
never on the test split.

    best = BestCheckpoint(checkpoint_dir, metric="map_at_r", is_main=env.is_main, log=log, step=pos.step)
    best.consider(val_metrics, pos, embedder)   # rank 0, after each evaluation of the val split: kept if better
    best.load_into(embedder)                    # every rank, at the end: the weights the test split is scored on

`<checkpoint dir>/best.pt` holds the embedder's weights (its state dict, as `trainer.checkpoint.load` gives a
model) with `metric`, `value`, `epoch`, `step` and the val metrics of that evaluation; written atomically (temp
file + rename). Higher is better for every metric the evaluation reports (Recall@K, MAP@R, R-precision, NMI);
a tie keeps the earlier evaluation. A resumed run goes on from the record, unless the record is from a step after
the checkpoint it resumed from (evaluations of training that was lost): then it starts afresh.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import cast

import torch

from trainer.checkpoint import TMP_PREFIX

BEST_FILE = "best.pt"


def metric_name(metric: str) -> str:
    """`map_at_r` -> `MAP@R`, `recall_at_1` -> `Recall@1` (for the report)."""
    names = {"map_at_r": "MAP@R", "r_precision": "R-precision", "nmi": "NMI"}
    if metric.startswith("recall_at_"):
        return "Recall@" + metric[len("recall_at_"):]
    return names.get(metric, metric)


class BestCheckpoint:
    """The record of the best validation evaluation so far and its weights (see the module docstring)."""

    def __init__(self, directory: str, metric: str, *, is_main: bool, log: Callable[[str], None], step: int = 0):
        self.path, self.metric, self.is_main, self.log = os.path.join(directory, BEST_FILE), metric, is_main, log
        self.record: dict | None = None  # {"metric", "value", "epoch", "step", "metrics"}
        if os.path.isfile(self.path):
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            record = {k: v for k, v in saved.items() if k != "model"}
            if record.get("metric") == metric and int(record.get("step", 0)) <= step:
                self.record = record
            elif is_main:
                log(f"{self.path}: from another metric or from step {record.get('step')} after the checkpoint "
                    f"resumed (step {step}); the best checkpoint is chosen afresh")

    @property
    def value(self) -> float | None:
        return None if self.record is None else float(self.record["value"])

    def consider(self, metrics: dict, pos, embedder: torch.nn.Module) -> bool:
        """Rank 0 (with the evaluation's metrics): keep the embedder's weights when `metrics[metric]` beats the
        best so far. Returns whether it did. Raises KeyError when the evaluation lacks the metric (the config's
        check prevents it)."""
        if not self.is_main or not metrics:
            return False
        value = float(metrics[self.metric])
        if self.record is not None and not value > self.record["value"]:
            return False
        self.record = dict(metric=self.metric, value=value, epoch=int(pos.epoch), step=int(pos.step),
                           metrics={k: float(v) for k, v in metrics.items()})
        model = unwrap(embedder)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=TMP_PREFIX, suffix=".pt")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(dict(self.record, model=state), f)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        self.log(f"best val {metric_name(self.metric)} so far: {value:.4f} (epoch {pos.epoch}, step {pos.step}); "
                 f"weights kept in {self.path}")
        return True

    def load_into(self, embedder: torch.nn.Module) -> dict | None:
        """Every rank: load the best weights into `embedder` (call after a barrier: rank 0 writes them). Returns
        the record, or None (weights unchanged) when no evaluation was recorded."""
        if not os.path.isfile(self.path):
            return None
        saved = torch.load(self.path, map_location="cpu", weights_only=True)
        unwrap(embedder).load_state_dict(saved.pop("model"))
        self.record = saved
        return saved


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP / DeepSpeed / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = cast(torch.nn.Module, getattr(model, "module", None) or model._orig_mod)
    return model
