"""What a run tells its user on rank 0: what it is about to do, and at the end what it achieved and where it all is.

    report = RunReport.start(facts, tracker, pos, latest, log)   # end of the build: dataset, model, loss, ranks, steps
    report.evaluated(metrics, pos, split="test")   # after each evaluation: kept in <run_dir>/summary.json
                                        # (survives resumes); split "val" with a val split, then "test" once
                                        # and the MLflow run description (mlflow.note.content) shows its Recall@1
    report.end()                        # end of fit(): best and final Recall@1, MAP@R, paths, MLflow run, `mlflow ui`
    report.already_complete()           # a finished run started again: says so, its final metrics, how to start anew

Every method prints on rank 0 only (through `log`) and is a no-op elsewhere, except `evaluated`, which every rank
may call (only rank 0 writes the file). The build step (trainer/build.py) hands it `RunFacts`: it reads no config.
"""
from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainer.tracking import sqlite_path
from trainer.tracking.store import runs_page_url

MLFLOW_UI = "http://127.0.0.1:5000"  # where `mlflow ui` answers by default

SUMMARY_FILE = "summary.json"  # in the run directory: {"evaluations": [{"epoch", "step", "split", "metrics"}, ...]}


@dataclass(frozen=True)
class RunFacts:
    """What the run is, in words and numbers, as the build step found it."""
    run_name: str
    run_dir: str
    loss: str  # describe_loss(): "ProxyGML (gather, 1 proxies/class, r 0.05, lam 0.3)"
    backbone: str
    dim: int
    engine: str
    data_root: str
    epochs: int
    global_batch: int
    batches_per_epoch: int
    world_size: int
    device_type: str
    is_main: bool
    train: Any  # data_shards.Manifest of the train split
    test: Any
    weights: str = ""  # the backbone's initial weights: the file loaded and that it matched in full, or why none
    val: Any = None  # the val split's (data.val_split), or None
    select_metric: str = "map_at_r"  # eval.select_metric (with a val split)
    test_at_end: bool = True  # eval.test


@dataclass
class Evaluation:
    epoch: int
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    split: str = "test"  # "val": the val split during training; "test": the test split


def mlflow_ui_command(uri: str) -> str | None:
    """The command that shows a local store in the MLflow UI (None for a server: it has its own address)."""
    if sqlite_path(uri) is None and not uri.startswith("file:"):
        return None
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def describe_loss(cfg_loss) -> str:
    """`ProxyGML (gather, 4 proxies/class, r 0.25, lam 0.3)` or `CosFaceLoss (gather)`, etc."""
    from loss import get_family
    family = get_family(cfg_loss.family)
    return family.describe(cfg_loss[family.name], cfg_loss.mode)


def _fmt(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


class RunReport:
    """The start and end summaries of one run; see the module docstring."""

    def __init__(self, facts: RunFacts, tracker, pos, latest: Callable[[], str | None], log: Callable[[str], None]):
        self.f, self.tracker, self.pos, self.latest, self.log = facts, tracker, pos, latest, log
        self.path = os.path.join(facts.run_dir, SUMMARY_FILE)
        self.history: list[Evaluation] = []
        if os.path.exists(self.path):  # a resumed run: its evaluations up to the checkpoint it resumed from
            with open(self.path) as f:
                saved = json.load(f).get("evaluations", [])
            self.history = [Evaluation(int(e["epoch"]), int(e["step"]), dict(e["metrics"]), e.get("split", "test"))
                            for e in saved if int(e["step"]) <= pos.step]

    @classmethod
    def start(cls, facts: RunFacts, tracker, pos, latest, log) -> RunReport:
        """Build the report and print what the run is about to do (nothing when it is already complete)."""
        report = cls(facts, tracker, pos, latest, log)
        if not report.complete:
            for line in report.start_lines():
                log(line)
            tracker.log_dataset(facts.train, "train")
            tracker.log_dataset(facts.test, "test")
            if facts.val is not None:
                tracker.log_dataset(facts.val, "validation")
            tracker.set_description(report.description())
        return report

    def description(self) -> str:
        """The MLflow run description (markdown): what was trained on what, and the latest Recall@1."""
        f = self.f
        train, test = f.train, f.test
        text = (f"**{f.loss}** on **{train.name}** (train {train.num_samples:,} images / "
                f"{train.num_classes:,} classes, test {test.num_samples:,} / {test.num_classes:,}), backbone "
                f"**{f.backbone}** -> {f.dim}-d, {f.world_size} rank(s) on {f.device_type} "
                f"({f.engine}), {f.epochs} epochs of {f.batches_per_epoch} steps."
                + (f" Weights: {f.weights}." if f.weights else ""))
        if f.val is not None:
            return text + "\n\n" + "\n".join(line.strip() for line in self.val_lines())
        scored = [e for e in self.test_history if "recall_at_1" in e.metrics]
        if scored:
            last, best = scored[-1], max(scored, key=lambda e: e.metrics["recall_at_1"])
            done = "final" if last.epoch >= f.epochs else "latest"
            text += (f"\n\n**Recall@1 {last.metrics['recall_at_1']:.4f}** ({done}, epoch {last.epoch}, step "
                     f"{last.step}; MAP@R {_fmt(last.metrics, 'map_at_r')}); best {best.metrics['recall_at_1']:.4f} "
                     f"at epoch {best.epoch}.")
        return text

    @property
    def complete(self) -> bool:
        return self.pos.epoch >= self.f.epochs

    def start_lines(self) -> list[str]:
        f, pos = self.f, self.pos
        train, test = f.train, f.test
        total = f.epochs * f.batches_per_epoch
        left = total - pos.step
        lines = [
            f"run {f.run_name}: {f.loss} on the {train.name} shards at {f.data_root} "
            f"(train {train.num_samples:,} images / {train.num_classes:,} classes, "
            f"test {test.num_samples:,} / {test.num_classes:,}"
            + (f", val {f.val.num_samples:,} / {f.val.num_classes:,}" if f.val is not None else "") + ")",
            f"  model {f.backbone} -> {f.dim}-d embedding; {f.world_size} rank(s) on "
            f"{f.device_type}, engine {f.engine}; {f.epochs} epochs x {f.batches_per_epoch} "
            f"steps of {f.global_batch} = {total:,} steps" + (f" ({left:,} left)" if pos.step else ""),
        ]
        if f.weights:
            lines.append(f"  weights {f.weights}")
        if self.tracker.active:
            for name, backend in self.tracker.backends.items():
                if name == "mlflow":
                    lines.append(f"  MLflow run {self.tracker.run_id or '(store not answering yet)'} in experiment "
                                 f"{self.tracker.experiment!r} at {self.tracker.uri}")
                else:
                    lines.append(f"  {name} run {self.tracker.run_ids.get(name) or '(store not answering yet)'} "
                                 f"({backend})")
        return lines

    @property
    def test_history(self) -> list[Evaluation]:
        return [e for e in self.history if e.split == "test"]

    def val_lines(self) -> list[str]:
        """With a val split: the best val evaluation (the checkpoint kept) and the test split's one evaluation."""
        from trainer.selection import metric_name
        key = self.f.select_metric
        vals = [e for e in self.history if e.split == "val" and key in e.metrics]
        if not vals:
            return ["  no val evaluation recorded yet"]
        best = max(vals, key=lambda e: (e.metrics[key], -e.step))
        lines = [f"  val (classes held out of training): best {metric_name(key)} {best.metrics[key]:.4f} at epoch "
                 f"{best.epoch}, step {best.step} (Recall@1 {_fmt(best.metrics, 'recall_at_1')}): the checkpoint "
                 f"kept"]
        tests = self.test_history
        if tests:
            t = tests[-1]
            lines.append(f"  test (evaluated once, on that checkpoint): Recall@1 {_fmt(t.metrics, 'recall_at_1')}, "
                         f"MAP@R {_fmt(t.metrics, 'map_at_r')}")
        elif not self.f.test_at_end:
            lines.append("  test: not evaluated (eval.test=false: the test classes stay untouched)")
        return lines

    def evaluated(self, metrics: dict, pos, split: str = "test", selected: dict | None = None) -> None:
        """Record an evaluation of `split` at `pos` (epoch, step); rank 0 keeps the list in summary.json, with
        the `selected` checkpoint's record (trainer/selection.py) once the test split was scored on it."""
        self.history.append(Evaluation(int(pos.epoch), int(pos.step), {k: float(v) for k, v in metrics.items()},
                                       split))
        if not self.f.is_main:
            return
        self.tracker.set_description(self.description())
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            data: dict[str, Any] = {"evaluations": [vars(e) for e in self.history]}
            if selected is not None:
                data["selected"] = {k: v for k, v in selected.items() if k != "model"}
            json.dump(data, f, indent=1)
        os.replace(tmp, self.path)
    def result_lines(self) -> list[str]:
        """Best and final Recall@1 (with epochs) and MAP@R, or a line saying there was no evaluation; with a val split
        the best val evaluation and the test split's one evaluation on it."""
        if self.f.val is not None:
            return self.val_lines()
        scored = [e for e in self.test_history if "recall_at_1" in e.metrics]
        if not scored:
            return ["  no evaluation recorded (eval.every_epochs and the last epoch evaluate the test split)"]
        final = scored[-1]
        best = max(scored, key=lambda e: (e.metrics["recall_at_1"], e.step))
        before = scored[0] if scored[0].step == 0 and len(scored) > 1 else None
        first = f" (before training {_fmt(before.metrics, 'recall_at_1')})" if before else ""
        return [f"  final Recall@1 {_fmt(final.metrics, 'recall_at_1')}, MAP@R {_fmt(final.metrics, 'map_at_r')} "
                f"(epoch {final.epoch}, step {final.step}){first}",
                f"  best  Recall@1 {_fmt(best.metrics, 'recall_at_1')}, MAP@R {_fmt(best.metrics, 'map_at_r')} "
                f"(epoch {best.epoch}, step {best.step})"]

    def where_lines(self) -> list[str]:
        run_dir = self.f.run_dir
        lines = [f"  run directory  {run_dir}",
                 f"  checkpoint     {self.latest() or 'none'}",
                 f"  config         {os.path.join(run_dir, 'config.yaml')}"]
        tracker = self.tracker
        if not tracker.active:
            lines.append("  MLflow         off (tracking.enabled=false)")
            return lines
        for name, backend in tracker.backends.items():
            run_id = tracker.run_ids.get(name) or "(not created: see the warning above)"
            lines.append(f"  MLflow         run {run_id}, experiment {tracker.experiment!r}, store {tracker.uri}"
                         if name == "mlflow" else f"  {name:<14} run {run_id}, {backend}")
        if tracker.unsent:
            lines.append(f"  not sent yet   python -m trainer.tracking upload {run_dir}")
        if tracker.uri is None:  # no MLflow backend
            return lines
        ui = mlflow_ui_command(tracker.uri)
        lines.append(f"  look at it     {ui}" if ui else f"  look at it     {tracker.uri} (the server's UI)")
        if tracker.experiment_id is not None:
            lines.append(f"  then open      {runs_page_url(MLFLOW_UI if ui else tracker.uri, tracker.experiment_id)}")
        return lines

    def end(self) -> None:
        """Print the end summary (rank 0)."""
        if not self.f.is_main:
            return
        lines = [f"run {self.f.run_name} finished: {self.pos.epoch} epochs, {self.pos.step:,} steps"]
        for line in lines + self.result_lines() + self.where_lines():
            self.log(line)

    def already_complete(self) -> dict:
        """A finished run started again: say so, show its final metrics and how to start another. Returns the
        final metrics (empty when none were recorded)."""
        name = self.f.run_name
        if self.f.is_main:
            lines = [f"run {name} is already complete: epoch {self.pos.epoch} of {self.f.epochs}, "
                     f"step {self.pos.step:,}; nothing to train",
                     *self.result_lines(), *self.where_lines(),
                     f"  to train a new run, give it another name: run.name={name}-2 (or run.output_dir=...)"]
            for line in lines:
                self.log(line)
        scored = [e for e in self.test_history if e.metrics]
        return dict(scored[-1].metrics) if scored else {}
