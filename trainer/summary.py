"""What a run tells its user on rank 0: what it is about to do, and at the end what it achieved and where it all is.

    report = RunReport.start(trainer)   # end of Trainer.__init__: dataset, model, loss, ranks, engine, steps planned
    report.evaluated(metrics, pos)      # after each evaluation: kept in <run_dir>/summary.json (survives resumes)
                                        # and the MLflow run description (mlflow.note.content) shows its Recall@1
    report.end()                        # end of fit(): best and final Recall@1, MAP@R, paths, MLflow run, `mlflow ui`
    report.already_complete()           # a finished run started again: says so, its final metrics, how to start anew

Every method prints on rank 0 only (through the trainer's `log`) and is a no-op elsewhere, except `evaluated`,
which every rank may call (only rank 0 writes the file).
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field

from data_shards import read_manifest
from trainer.tracking import sqlite_path

SUMMARY_FILE = "summary.json"  # in the run directory: {"evaluations": [{"epoch", "step", "metrics"}, ...]}


@dataclass
class Evaluation:
    epoch: int
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


def mlflow_ui_command(uri: str) -> str | None:
    """The command that shows a local store in the MLflow UI (None for a server: it has its own address)."""
    if sqlite_path(uri) is None and not uri.startswith("file:"):
        return None
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def describe_loss(cfg_loss) -> str:
    """`ProxyGML (gather, 4 proxies/class, r 0.25, lam 0.3)` or `CosFaceLoss (gather)`, etc."""
    if cfg_loss.name == "proxygml":
        return (f"ProxyGML ({cfg_loss.mode}, {cfg_loss.proxies_per_class} proxies/class, r {cfg_loss.r:g}, "
                f"lam {cfg_loss.lam:g})")
    miner = f", miner {cfg_loss.miner}" if cfg_loss.miner else ""
    return f"{cfg_loss.name} ({cfg_loss.mode}{miner})"


def _fmt(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"


class RunReport:
    """The start and end summaries of one Trainer; see the module docstring."""

    def __init__(self, trainer):
        self.t = trainer
        self.path = os.path.join(trainer.run_dir, SUMMARY_FILE)
        self.history: list[Evaluation] = []
        self._train_manifest = None
        if os.path.exists(self.path):  # a resumed run: its evaluations up to the checkpoint it resumed from
            with open(self.path) as f:
                saved = json.load(f).get("evaluations", [])
            self.history = [Evaluation(int(e["epoch"]), int(e["step"]), dict(e["metrics"])) for e in saved
                            if int(e["step"]) <= trainer.pos.step]

    @classmethod
    def start(cls, trainer) -> RunReport:
        """Build the report and print what the run is about to do (nothing when it is already complete)."""
        report = cls(trainer)
        if trainer.pos.epoch < trainer.cfg.train.epochs:
            for line in report.start_lines():
                trainer.log(line)
            trainer.tracker.log_dataset(report.train_manifest, "train")
            trainer.tracker.log_dataset(trainer.test_manifest, "test")
            trainer.tracker.set_description(report.description())
        return report

    @property
    def train_manifest(self):
        if self._train_manifest is None:
            self._train_manifest = read_manifest(self.t.train_dir)
        return self._train_manifest

    def description(self) -> str:
        """The MLflow run description (markdown): what was trained on what, and the latest Recall@1."""
        t, cfg = self.t, self.t.cfg
        train, test = self.train_manifest, t.test_manifest
        text = (f"**{describe_loss(cfg.loss)}** on **{train.dataset}** (train {train.num_samples:,} images / "
                f"{train.num_classes:,} classes, test {test.num_samples:,} / {test.num_classes:,}), backbone "
                f"**{cfg.model.backbone}** -> {cfg.model.dim}-d, {t.env.world_size} rank(s) on {t.env.device.type} "
                f"({cfg.engine.name}), {cfg.train.epochs} epochs of {t.batches_per_epoch} steps.")
        scored = [e for e in self.history if "recall_at_1" in e.metrics]
        if scored:
            last, best = scored[-1], max(scored, key=lambda e: e.metrics["recall_at_1"])
            done = "final" if last.epoch >= cfg.train.epochs else "latest"
            text += (f"\n\n**Recall@1 {last.metrics['recall_at_1']:.4f}** ({done}, epoch {last.epoch}, step "
                     f"{last.step}; MAP@R {_fmt(last.metrics, 'map_at_r')}); best {best.metrics['recall_at_1']:.4f} "
                     f"at epoch {best.epoch}.")
        return text

    @property
    def complete(self) -> bool:
        return self.t.pos.epoch >= self.t.cfg.train.epochs

    def start_lines(self) -> list[str]:
        t, cfg = self.t, self.t.cfg
        train, test = self.train_manifest, t.test_manifest
        total = cfg.train.epochs * t.batches_per_epoch
        left = total - t.pos.step
        lines = [
            f"run {cfg.run.name}: {describe_loss(cfg.loss)} on the {train.dataset} shards at {cfg.data.root} "
            f"(train {train.num_samples:,} images / {train.num_classes:,} classes, "
            f"test {test.num_samples:,} / {test.num_classes:,})",
            f"  model {cfg.model.backbone} -> {cfg.model.dim}-d embedding; {t.env.world_size} rank(s) on "
            f"{t.env.device.type}, engine {cfg.engine.name}; {cfg.train.epochs} epochs x {t.batches_per_epoch} "
            f"steps of {cfg.train.batch_size} = {total:,} steps" + (f" ({left:,} left)" if t.pos.step else ""),
        ]
        if t.tracker.active:
            lines.append(f"  MLflow run {t.tracker.run_id or '(store not answering yet)'} in experiment "
                         f"{t.tracker.experiment!r} at {t.tracker.uri}")
        return lines

    def evaluated(self, metrics: dict, pos) -> None:
        """Record an evaluation at `pos` (epoch, step); rank 0 keeps the list in summary.json."""
        self.history.append(Evaluation(int(pos.epoch), int(pos.step), {k: float(v) for k, v in metrics.items()}))
        if not self.t.env.is_main:
            return
        self.t.tracker.set_description(self.description())
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"evaluations": [vars(e) for e in self.history]}, f, indent=1)
        os.replace(tmp, self.path)

    def result_lines(self) -> list[str]:
        """Best and final Recall@1 (with epochs) and MAP@R, or a line saying there was no evaluation."""
        scored = [e for e in self.history if "recall_at_1" in e.metrics]
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
        t = self.t
        lines = [f"  run directory  {t.run_dir}",
                 f"  checkpoint     {t.ckpt.latest() or 'none'}",
                 f"  config         {os.path.join(t.run_dir, 'config.yaml')}"]
        tracker = t.tracker
        if not tracker.active:
            lines.append("  MLflow         off (tracking.enabled=false)")
            return lines
        lines.append(f"  MLflow         run {tracker.run_id or '(not created: see the warning above)'}, "
                     f"experiment {tracker.experiment!r}, store {tracker.uri}")
        if tracker.pending.exists():
            lines.append(f"  not sent yet   python -m trainer.tracking upload {t.run_dir}")
        ui = mlflow_ui_command(tracker.uri)
        lines.append(f"  look at it     {ui}" if ui else f"  look at it     {tracker.uri} (the server's UI)")
        return lines

    def end(self) -> None:
        """Print the end summary (rank 0)."""
        if not self.t.env.is_main:
            return
        t = self.t
        lines = [f"run {t.cfg.run.name} finished: {t.pos.epoch} epochs, {t.pos.step:,} steps"]
        for line in lines + self.result_lines() + self.where_lines():
            t.log(line)

    def already_complete(self) -> dict:
        """A finished run started again: say so, show its final metrics and how to start another. Returns the
        final metrics (empty when none were recorded)."""
        t = self.t
        name = t.cfg.run.name
        if t.env.is_main:
            lines = [f"run {name} is already complete: epoch {t.pos.epoch} of {t.cfg.train.epochs}, "
                     f"step {t.pos.step:,}; nothing to train",
                     *self.result_lines(), *self.where_lines(),
                     f"  to train a new run, give it another name: run.name={name}-2 (or run.output_dir=...)"]
            for line in lines:
                t.log(line)
        scored = [e for e in self.history if e.metrics]
        return dict(scored[-1].metrics) if scored else {}
