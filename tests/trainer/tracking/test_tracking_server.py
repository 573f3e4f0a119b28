"""trainer.tracking against a real `mlflow server` on 127.0.0.1 (started and stopped here): a run that logs
through HTTP, whose server is killed mid-run, keeps training, and is uploaded afterwards with the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from PIL import Image

from data_shards.lookup import shard_image_lookup
from tests.helpers import free_port
from tests.services import wait_for_mlflow
from tests.trainer.tracking.test_tracking import (  # noqa: F401
    eval_result,
    metric_steps,
    no_mlflow_env,
    shards,
    tiny_embedder,
)
from trainer import tracking
from trainer.config import TrackingConfig
from trainer.tracking import Tracker

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
ROOT = Path(__file__).resolve().parents[3]  # the repository
START_TIMEOUT_S = 240  # the server takes 10-50 s to come up on a busy 2-core machine


class MlflowServer:
    """`mlflow server` with a SQLite backend and proxied artifacts, in its own process group."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> MlflowServer:
        self.log = self.root / "server.log"
        log = open(self.log, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)
        self._log = log
        wait_for_mlflow(self, START_TIMEOUT_S)
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)  # the server and its uvicorn worker
            self.proc.wait(timeout=60)
        if self.proc is not None:
            self._log.close()
        self.proc = None


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "server"
    root.mkdir()
    srv = MlflowServer(root, free_port())
    yield srv
    srv.stop(signal.SIGKILL)


def live_run(tmp_path, server, shards, eval_result, model):  # noqa: F811
    """A run that logs through the server, which is killed mid-run; the loop goes on and closes the run.
    Returns (tracker, seconds the 20 steps, an evaluation and the model took while the server was dead)."""
    cfg = TrackingConfig(enabled=True, tracking_uri=server.uri, experiment="served", run_name="live",
                         retrieval_grid_queries=3)
    tracker = Tracker(cfg, tmp_path / "runs" / "live", rank=0, config={"train": {"epochs": 3}, "loss": {"r": 0.05}})
    assert tracker.online
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    tracker.log_evaluation(eval_result, step=4, epoch=1, image_lookup=shard_image_lookup(shards))
    assert tracker.flush(timeout=120) and tracker.online

    server.stop(signal.SIGKILL)  # the server disappears mid-run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        for step in range(5, 25):  # the training loop goes on
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
        tracker.log_evaluation(eval_result, step=24, epoch=2, image_lookup=shard_image_lookup(shards))
        tracker.log_model(model)
        elapsed = time.monotonic() - t0
        tracker.close()
    failures = [w for w in caught if "training goes on" in str(w.message)]
    assert len(failures) == 1, [str(w.message) for w in caught]
    assert not tracker.online
    assert (tracker.run_dir / "tracking" / "mlflow" / "pending.jsonl").exists()
    return tracker, elapsed


@pytest.mark.slow  # 13 s; the services tests restart a real shared server mid-run in CI
def test_server_dies_mid_run(tmp_path, server, shards, eval_result):  # noqa: F811
    """Live logging through HTTP (artifacts proxied by the server), then the server is killed: what was
    sent is in the server's store, the rest waits in pending.jsonl, and the loop was not stalled."""
    server.start()
    model = tiny_embedder()
    tracker, elapsed = live_run(tmp_path, server, shards, eval_result, model)
    assert elapsed < 90, f"the dead server stalled the loop for {elapsed:.0f} s"

    backend = mlflow.MlflowClient(f"sqlite:///{server.root / 'server.db'}")  # the dead server's own store
    run = backend.get_run(tracker.run_id)
    assert run.info.status == "RUNNING" and run.data.params == {"train.epochs": "3", "loss.r": "0.05"}
    assert [s for s, _ in metric_steps(backend, tracker.run_id, "loss")] == list(range(5))
    assert run.data.metrics["eval/recall_at_1"] == eval_result.metrics["recall_at_1"]
    grids = list((server.root / "artifacts").rglob("step-000000004/retrieval_grid.png"))
    assert len(grids) == 1
    with Image.open(grids[0]) as im:
        im.load()
    table = next((server.root / "artifacts").rglob("step-000000004/per_class_recall.csv"))
    assert len(pd.read_csv(table)) == len(eval_result.per_class)
    pending = [json.loads(line) for line in (tracker.dir / "mlflow" / "pending.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in pending if e["op"] == "metrics" and "loss" in e["metrics"]]
    assert steps == list(range(5, 25)) and [e["op"] for e in pending][-2:] == ["model", "end"]


@pytest.mark.slow
def test_server_killed_mid_run_then_uploaded(tmp_path, server, shards, eval_result):  # noqa: F811
    """As above, then the server comes back and `python -m trainer.tracking upload RUN_DIR` completes the run."""
    server.start()
    model = tiny_embedder()
    tracker, _ = live_run(tmp_path, server, shards, eval_result, model)
    run_dir, pending = tracker.run_dir, tracker.dir / "mlflow" / "pending.jsonl"

    server.start()  # back (same port, same backend): upload what was kept
    out = subprocess.run([sys.executable, "-m", "trainer.tracking", "upload", str(run_dir)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert not pending.exists()
    assert json.loads((run_dir / "tracking" / "mlflow" / "state.json").read_text())["run_id"] == tracker.run_id

    client = mlflow.MlflowClient(server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "live"
    assert run.data.params == {"train.epochs": "3", "loss.r": "0.05"}
    assert [s for s, _ in metric_steps(client, tracker.run_id, "loss")] == list(range(25))
    assert [s for s, _ in metric_steps(client, tracker.run_id, "eval/recall_at_1")] == [4, 24]
    dl = Path(mlflow.artifacts.download_artifacts(run_id=tracker.run_id, artifact_path="evaluations",
                                                  dst_path=str(tmp_path / "dl"), tracking_uri=server.uri))
    for step in ("step-000000004", "step-000000024"):  # logged live, and uploaded afterwards
        with Image.open(dl / step / "retrieval_grid.png") as im:
            im.load()
        assert len(pd.read_csv(dl / step / "per_class_recall.csv")) == len(eval_result.per_class)
    with tracking.mlflow_globals(server.uri):
        loaded = mlflow.pytorch.load_model(f"runs:/{tracker.run_id}/model")
    x = torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
