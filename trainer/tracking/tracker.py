"""The Tracker facade: what the training loop calls to log a run (rank 0 logs, every other rank and disabled
tracking do nothing). Each call turns into backend-neutral events (pictures and tables are written to
`<run_dir>/tracking/artifacts/` first) that one sender thread per backend (trainer.tracking.sender) delivers to the
backends `tracking.backends` names (trainer.tracking.backend: MLflow by default)."""
from __future__ import annotations

import copy
import hashlib
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.redact import redact, redact_tree
from trainer.tracking import plots
from trainer.tracking.backend import get_backend
from trainer.tracking.sender import TRACKING_DIR, Sender, read_state, upgrade_layout, write_state
from trainer.tracking.summaries import (
    flatten_config,
    gpu_memory_metrics,
    metric_key,
    per_class_summary,
    recall_at_k,
    scalar,
    system_facts,
    to_container,
    worst_classes,
    worst_text,
    write_csv,
)

STEP_DIR = "step-{:09d}"  # artifact folders per step, padded as the checkpoints (checkpoints/step-000000028.pt)
DESCRIPTION_TAG = "mlflow.note.content"  # the run description the MLflow UI shows (markdown)


DEFAULT_BACKENDS = ("mlflow",)  # tracking.backends when the config does not say


class LoginRefused(UserError):
    """The tracking server refused this client's credentials when the run started (nothing was trained yet)."""


class Tracker:
    """Logs a training run from rank 0 to every backend of `cfg.backends`; a no-op on other ranks and when
    `cfg.enabled` is false.

    cfg: any object with enabled, backends, tracking_uri, experiment, run_name, log_every_steps,
    retrieval_grid_queries (trainer.config.TrackingConfig; without `backends`: MLflow). config: the resolved run
    config (DictConfig or dict), logged flattened as params and as config.yaml. resume_run_ids: {backend: run id}
    to continue (a checkpoint's `tracker_run_ids`). world_size: the run's, for the `sys.world_size` tag (default:
    $WORLD_SIZE, else 1).

    A server that requires a login (MLflow's basic-auth app) reads it from MLFLOW_TRACKING_USERNAME /
    MLFLOW_TRACKING_PASSWORD (MLflow's client does; nothing here stores them). Raises LoginRefused (a UserError:
    one line, exit 2) when a backend's server refuses them at the first connection, before any training; ValueError
    for a backend name that is not registered.
    """

    def __init__(self, cfg, run_dir, *, rank: int = 0, config: Any = None,
                 resume_run_ids: Mapping[str, str] | None = None,
                 world_size: int | None = None):
        self.cfg = cfg
        self.active = bool(cfg.enabled) and rank == 0
        self._closed = False
        self._senders: dict[str, Sender] = {}
        if not self.active:
            return
        container = redact_tree(to_container(config))  # bad config type: an error before anything is created
        classes = {name: get_backend(name) for name in getattr(cfg, "backends", DEFAULT_BACKENDS)}
        if not classes:
            raise ValueError("tracking.backends: empty; give at least one backend, or tracking.enabled=false")
        resume = resume_run_ids or {}
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / TRACKING_DIR
        self.experiment = cfg.experiment or "proxygml"
        self.dir.mkdir(parents=True, exist_ok=True)
        upgrade_layout(self.dir)  # a queue an earlier version kept (MLflow's, in tracking/ itself)
        # every call to a backend happens in its sender thread: a slow or hung server never blocks a step
        for name, cls in classes.items():
            sender = Sender(cls(cfg, self.run_dir), self.dir / name, self.run_dir, resume.get(name))
            self._senders[name] = sender
            if sender.refused is not None:
                for started in self._senders.values():
                    started.abort()
                self.active = False
                raise LoginRefused(sender.refused)
        resumed = any(s.resumed for s in self._senders.values())  # the same run goes on: so does its recall curve
        self.eval_history: list[tuple[int, dict[int, float]]] = [
            (int(s), {int(k): v for k, v in r.items()}) for s, r in read_state(self.dir).get("eval_history", [])
        ] if resumed else []
        self._write_history()
        tags = system_facts(world_size or int(os.environ.get("WORLD_SIZE", "1")))
        if getattr(cfg, "parent_run_id", ""):  # a nested run (a trial of python -m trainer.sweep)
            tags["mlflow.parentRunId"] = cfg.parent_run_id
        self._emit({"op": "tags", "tags": tags})
        if container:
            self._emit({"op": "params", "params": flatten_config(container)})
            self._log_config_yaml(container)

    # -- public API

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params beyond the config (what the build step found, e.g. `weights.loaded`); logged once per run."""
        if self.active:
            self._emit({"op": "params", "params": {str(k): str(v) for k, v in params.items()}})

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """One batch of scalar metrics at `step` (tensors and numpy scalars welcome); GPU memory added."""
        if not self.active:
            return
        values = {metric_key(k): scalar(k, v) for k, v in metrics.items()}
        values.update(gpu_memory_metrics())
        self._emit({"op": "metrics", "step": int(step), "timestamp": _now_ms(), "metrics": values})

    def log_evaluation(self, result, step: int, epoch: int | None = None,
                       image_lookup: Callable[[list[str]], Mapping[str, Any]] | None = None,
                       prefix: str = "eval") -> None:
        """All metrics of an EvalResult (as `<prefix>/<name>`), the per-class table with its summaries, the
        worst classes, a histogram of per-class recall, the recall curve and the retrieval grid (its images
        from `image_lookup`, e.g. data_shards.lookup.shard_image_lookup(test_split_dir)).

        prefix: `eval` (the test split during training, runs without a val split), `val` (the val split) or
        `test` (the test split once, on the best val checkpoint); the artifacts of `val` and `test` go to
        `evaluations/<prefix>/step-N/`, and the recall curve follows the evaluations during training only."""
        if not self.active or result is None or result.metrics is None:
            return
        metrics, texts = {}, {}
        for k, v in result.metrics.items():
            try:
                metrics[f"{prefix}/{metric_key(k)}"] = scalar(k, v)
            except ValueError:  # not a number: kept as a tag rather than dropped
                texts[f"{prefix}.{metric_key(k)}"] = str(v)
        if epoch is not None:
            metrics["epoch"] = float(epoch)
        folder = "evaluations" if prefix == "eval" else f"evaluations/{prefix}"
        out = self._artifact_dir(f"{folder}/{STEP_DIR.format(int(step))}")
        per_class = getattr(result, "per_class", None)
        if per_class is not None and len(per_class):
            metrics.update({f"{prefix}/{k}": v for k, v in per_class_summary(per_class).items()})
            write_csv(per_class, out / "per_class_recall.csv")
            worst = worst_classes(per_class)
            write_csv(worst, out / "worst_classes.csv")
            texts[f"{prefix}.worst_classes"] = worst_text(worst.head(10))
            self._picture(plots.recall_histogram, per_class["recall_at_1"].to_numpy(dtype=float),
                          str(out / "per_class_recall_hist.png"), title=f"per-class Recall@1, step {step}")
        recalls = recall_at_k(result.metrics)
        if recalls and prefix != "test":
            self.eval_history.append((int(step), recalls))
            self._write_history()
            self._picture(plots.recall_curve, self.eval_history, str(out / "recall_curve.png"))
        n_rows = int(getattr(self.cfg, "retrieval_grid_queries", 0) or 0)
        if image_lookup is not None and n_rows > 0:
            title = f"retrieval at step {int(step)}" + (f", epoch {epoch}" if epoch is not None else "")
            self._picture(self._retrieval_grid, result, image_lookup, n_rows, str(out / "retrieval_grid.png"),
                          title)
        self._emit({"op": "metrics", "step": int(step), "timestamp": _now_ms(), "metrics": metrics})
        if texts:
            self._emit({"op": "tags", "tags": texts})
        self._emit({"op": "artifacts", "local": str(out), "artifact_path": out.relative_to(self._artifacts)
                    .as_posix()})

    def set_description(self, text: str) -> None:
        """The run's description in the MLflow UI (markdown; the `mlflow.note.content` tag), replaced on each
        call: e.g. dataset, backbone, loss, world size and the latest Recall@1."""
        if self.active:
            self._emit({"op": "tags", "tags": {DESCRIPTION_TAG: str(text)}})

    def log_dataset(self, manifest, context: str) -> None:
        """A shard split as an MLflow dataset input of the run (mlflow.data): name `<name>/<split>` (Manifest.name:
        the source folder's name or the writer's --name), a digest of its shards' sha256, its location as source,
        and its counts (samples, classes, shards) as profile.

        manifest: data_shards.Manifest; context: "train" or "test" (the input's `mlflow.data.context` tag)."""
        if not self.active:
            return
        digest = hashlib.sha256("".join(manifest.shard_sha256).encode()).hexdigest()[:8]
        profile = {"samples": int(manifest.num_samples), "classes": int(manifest.num_classes),
                   "shards": len(manifest.shard_names), "skipped": int((manifest.skipped or {}).get("count", 0))}
        self._emit({"op": "dataset", "name": f"{manifest.name}/{manifest.split}", "digest": digest,
                    "location": redact(str(manifest.location)), "profile": profile, "context": context})

    def log_proxy_stats(self, stats, step: int) -> None:
        """Proxy selection statistics since the counts were last reset: the summaries as metrics `proxy/*`, the
        per-proxy and per-class vectors as CSV artifacts.

        stats: `(summary: dict, per_proxy: DataFrame, per_class: DataFrame)` as the criterion's collective
        `proxy_statistics()` gives them (computed and gathered by the caller, on every rank), or None when
        there is nothing to log (no proxy selected since the last reset, or a criterion without proxies).
        The tracker neither gathers nor resets the counts: the caller does."""
        if not self.active or stats is None:
            return
        summary, per_proxy, per_class = stats
        out = self._artifact_dir(f"proxies/{STEP_DIR.format(int(step))}")
        write_csv(per_proxy, out / "proxy_selection.csv")
        write_csv(per_class, out / "class_proxy_stats.csv")
        self._emit({"op": "metrics", "step": int(step), "timestamp": _now_ms(), "metrics": summary})
        self._emit({"op": "artifacts", "local": str(out), "artifact_path": out.relative_to(self._artifacts)
                    .as_posix()})

    def log_model(self, model) -> None:
        """The embedding model (DDP/DeepSpeed/torch.compile wrappers removed, a CPU copy) with mlflow.pytorch
        as `model` of the run: `mlflow.pytorch.load_model("runs:/<run_id>/model")` (or the run's `model_uri`
        tag) loads it back where this project is importable. Offline, the trainer's embedder is kept under
        tracking/model as data (store.save_offline_model) and uploaded later; another module is not kept.
        A model that cannot be serialised is reported with a warning, never fatal."""
        if not self.active:
            return
        while hasattr(model, "module") or hasattr(model, "_orig_mod"):
            model = getattr(model, "module", None) or model._orig_mod
        try:
            cpu_model = copy.deepcopy(model).cpu().eval()
        except Exception as e:
            warnings.warn(f"Tracker.log_model: the model could not be copied: {e!r}", RuntimeWarning, stacklevel=2)
            return
        self._emit({"op": "model_object", "model": cpu_model})

    def close(self, status: str = "FINISHED") -> None:
        """End the run in every backend (FINISHED | FAILED | KILLED); says how to upload what could not be sent."""
        if not self.active or self._closed:
            return
        self._closed = True
        end = {"op": "end", "status": status, "timestamp": _now_ms()}
        for sender in self._senders.values():
            sender.close(end)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close("FAILED" if exc_type else "FINISHED")

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event logged so far is delivered (or kept locally) by every backend; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for sender in self._senders.values():
            if not sender.flush(None if deadline is None else max(0.0, deadline - time.monotonic())):
                return False
        return True

    @property
    def run_ids(self) -> dict[str, str]:
        """{backend: run id} of the backends that have one (waiting, as run_id, for each first connection); what a
        checkpoint keeps as `tracker_run_ids`. {} off rank 0 and when disabled."""
        ids = {name: sender.wait_run_id() for name, sender in self._senders.items()}
        return {name: run_id for name, run_id in ids.items() if run_id}

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None off rank 0, when disabled, without the MLflow backend, or while the store has not
        answered yet: then this waits for the sender thread's first connection attempt: up to START_WAIT_S for a
        server)."""
        sender = self._senders.get("mlflow")
        return sender.wait_run_id() if self.active and sender is not None else None

    @property
    def experiment_id(self) -> str | None:
        """The MLflow experiment's id (None off rank 0, when disabled, or while the store has not answered)."""
        return self._mlflow.experiment_id if self.run_id else None

    @property
    def uri(self) -> str | None:
        """The MLflow tracking URI (None off rank 0, when disabled, or without the MLflow backend)."""
        return self._mlflow.uri if self._mlflow is not None else None

    @property
    def backends(self) -> dict:
        """{name: TrackingBackend} this tracker logs to ({} off rank 0 and when disabled)."""
        return {name: sender.backend for name, sender in self._senders.items()}

    @property
    def online(self) -> bool:
        """Whether the last call to every backend worked (events may still be queued: see flush)."""
        return self.active and all(sender.online for sender in self._senders.values())

    @property
    def pending(self) -> Path:
        """`<run_dir>/tracking/<backend>/pending.jsonl` of the first backend (MLflow's by default): the events kept
        locally while its store failed."""
        return next(iter(self._senders.values())).pending

    @property
    def unsent(self) -> bool:
        """Whether any backend keeps events locally (to upload with `python -m trainer.tracking upload`)."""
        return any(sender.pending.exists() for sender in self._senders.values())

    @property
    def _mlflow(self):
        sender = self._senders.get("mlflow")
        return sender.backend if sender is not None else None

    @property
    def _store(self):
        return self._mlflow.store

    # -- internals

    @property
    def _artifacts(self) -> Path:
        return self.dir / "artifacts"

    def _artifact_dir(self, rel: str) -> Path:
        path = self._artifacts / rel
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _log_config_yaml(self, container: dict) -> None:
        from omegaconf import OmegaConf

        out = self._artifact_dir("config")
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(container)))
        self._emit({"op": "artifacts", "local": str(out), "artifact_path": None})

    def _retrieval_grid(self, result, image_lookup, n_rows: int, path: str, title: str) -> None:
        plots.retrieval_grid_of(result, image_lookup, n_rows, path, title)

    def _picture(self, fn, *args, **kwargs) -> None:
        """A picture that fails to draw is reported, never fatal to training."""
        try:
            fn(*args, **kwargs)
        except Exception as e:
            warnings.warn(redact(f"Tracker: could not draw {fn.__name__}: {e!r}"), RuntimeWarning, stacklevel=3)

    def _emit(self, event: dict) -> None:
        for sender in self._senders.values():
            sender.emit(event)

    def _write_history(self) -> None:
        """The recall history (the recall curve's points) in `tracking/state.json`, for a resumed run."""
        write_state(self.dir, {**read_state(self.dir), "eval_history": self.eval_history})


def _now_ms() -> int:
    return int(time.time() * 1000)
