"""Tracking of a training run (MLflow by default): rank 0 logs, every other rank (and disabled tracking) does nothing.

    tracker = Tracker(cfg.tracking, run_dir, rank=rank, config=resolved_cfg, world_size=world_size)
    tracker.log_metrics({"loss": 0.3, "lr/backbone": 1e-4}, step)
    tracker.log_evaluation(eval_result, step, epoch, image_lookup=shard_image_lookup(test_split_dir))
    tracker.log_proxy_stats(criterion.proxy_statistics(), step)  # stats gathered by the caller (or None)
    tracker.log_dataset(read_manifest(split_dir), "train")   # an mlflow.data input: name, digest, counts
    tracker.set_description("**ProxyGML** on cub200 ...")    # the run description in the UI (markdown)
    tracker.log_model(model)
    tracker.close()

(`shard_image_lookup` is data_shards.lookup's: the tracker reads no shards and runs no collectives.)

Where it logs: `cfg.tracking_uri` if set, else $MLFLOW_TRACKING_URI, else a SQLite file
`sqlite:///<parent of run_dir>/mlflow.db` (artifacts beside it in `mlartifacts/`). A shared server with a login
(MLflow's basic-auth app) gets it from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, read by MLflow's client
and stored nowhere here; a login the server refuses at the start raises `LoginRefused` (one line, exit 2) before
any training (docs/object-storage-and-tracking-server.md).

Where else: `tracking.backends` names the backends a run logs to (default [mlflow]); a backend is a
TrackingBackend (trainer.tracking.backend) registered under its name below, and each gets the same events.

Every call to a backend is made by its sender thread, in order: a step only queues its event (pictures and
tables are written to `<run_dir>/tracking/artifacts/` first). A failing, unreachable or hung server never
stops nor stalls training: the first failure warns once, later events are appended to the backend's queue
`<run_dir>/tracking/<backend>/pending.jsonl` (MLflow's: tracking/mlflow/), the server is retried every
RETRY_INTERVAL_S and, once it answers, gets what is pending. Tracker() waits at most START_WAIT_S for a server's
run id, close() at most CLOSE_WAIT_S for the queue. A local store (SQLite file) is only ever busy, never far: its
waits follow progress (the run is created before Tracker() returns, close() returns once everything is
delivered), a busy answer is retried every LOCAL_RETRY_INTERVAL_S without a word, and only a store silent for
LOCAL_STALL_S is given up (those in trainer.tracking.sender). A model kept offline is data (model.safetensors +
recipe.json, rebuilt with trainer.model.build_model; the upload refuses anything else). Whatever is still pending
at the end is uploaded with

    python -m trainer.tracking upload RUN_DIR [--tracking-uri URI]

HTTP timeouts are kept short (MLFLOW_HTTP_REQUEST_TIMEOUT / _MAX_RETRIES / _BACKOFF_FACTOR default to
10 s / 2 / 1 unless set in the environment).

Files: tracker (the facade), backend (the interface, the registry), sender (a thread per backend, its queue:
pending.jsonl, state.json, retries), mlflow_backend (the MLflow backend), store (its MLflow calls), upload
(+ __main__: the CLI), summaries (pure tables and metrics), plots (pictures).
"""

from trainer.tracking.backend import TrackingBackend, backends, register_backend, unregister_backend
from trainer.tracking.mlflow_backend import MlflowBackend
from trainer.tracking.plots import GRID_NEIGHBOURS, nearest_neighbours, pick_queries
from trainer.tracking.sender import TRACKING_DIR
from trainer.tracking.store import (
    HTTP_DEFAULTS,
    default_tracking_uri,
    is_local_store,
    mlflow_globals,
    resolve_tracking_uri,
    shard_dataset,
    sqlite_path,
)
from trainer.tracking.summaries import (
    MAX_PARAM_VALUE,
    flatten_config,
    metric_key,
    per_class_summary,
    system_facts,
    worst_classes,
    write_csv,
)
from trainer.tracking.tracker import DESCRIPTION_TAG, STEP_DIR, LoginRefused, Tracker
from trainer.tracking.upload import main, upload

register_backend("mlflow", MlflowBackend)

__all__ = ["DESCRIPTION_TAG", "GRID_NEIGHBOURS", "HTTP_DEFAULTS", "LoginRefused", "MAX_PARAM_VALUE", "STEP_DIR",
           "TRACKING_DIR", "Tracker", "TrackingBackend", "backends", "default_tracking_uri", "register_backend",
           "unregister_backend", "flatten_config", "is_local_store", "main", "metric_key",
           "mlflow_globals", "nearest_neighbours", "per_class_summary", "pick_queries",
           "resolve_tracking_uri", "shard_dataset", "sqlite_path", "system_facts", "upload", "worst_classes",
           "write_csv"]
