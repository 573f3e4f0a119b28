"""Tracking to a shared MLflow server as teams run it, started here on 127.0.0.1: `mlflow server` on PostgreSQL
(Debian's), artifacts in an S3 bucket (moto's server), MLflow's basic-auth app. A training run logs everything
(params, metrics, per-class tables, pictures, the model, dataset inputs) with the login from
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which appears nowhere it writes; a wrong password is one line
before training; restarting the server or PostgreSQL mid-run loses no event (the offline queue)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.services import MlflowServer, MotoS3, Postgres
from tests.trainer.test_failure_paths import cli, one_error_line
from tests.trainer.test_trainer_loop import clean_env, tiny
from trainer.config import TrackingConfig
from trainer.tracking import Tracker, sender

pytestmark = [pytest.mark.services, pytest.mark.timeout(900),
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")]
USER, PASSWORD = "alice", "alice-Secret-pw-7391"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """moto (S3) + PostgreSQL + mlflow server (basic auth), with user alice; stopped at the end."""
    root = tmp_path_factory.mktemp("shared-server")
    s3 = MotoS3(root / "moto").start()
    pg = server = None
    try:
        pg = Postgres(root).start()
        server = MlflowServer(root / "mlflow", pg.uri, s3).start()
        server.add_user(USER, PASSWORD)
        yield s3, pg, server
    finally:
        if server is not None:
            server.stop()
        if pg is not None:
            pg.stop()
        s3.stop()


def login_env(password=PASSWORD) -> dict:
    env = {k: v for k, v in clean_env().items() if not k.startswith(("MLFLOW_", "AWS_"))}
    return {**env, "MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": password}


@pytest.fixture
def login(monkeypatch):
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)


def all_artifacts(client, run_id, path=None) -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += all_artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def files_containing(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_training_run_logs_everything_and_the_password_nowhere(services, shards, tmp_path, login):
    s3, _, server = services
    out_dir = tmp_path / "runs"
    status, out, _ = cli(tiny(shards, out_dir, "tracking.enabled=true", f"tracking.tracking_uri={server.uri}",
                              "tracking.experiment=shared", "checkpoint.format=torch"), timeout=400, env=login_env())
    assert status == 0, out[-3000:]
    client = MlflowClient(server.uri)
    run = client.search_runs([client.get_experiment_by_name("shared").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["data.root"] == shards and run.data.params["train.epochs"] == "2"
    assert {"eval/recall_at_1", "Train/loss"} <= set(run.data.metrics)
    arts = all_artifacts(client, run.info.run_id)
    assert "config.yaml" in arts
    assert any(a.endswith("per_class_recall.csv") for a in arts) and any(a.endswith(".png") for a in arts), arts
    assert "model_uri" in run.data.tags
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["digits/test", "digits/train"]
    keys = [o["Key"] for o in s3.boto().list_objects_v2(Bucket=server.bucket).get("Contents", [])]
    assert any(run.info.run_id in k and k.endswith("config.yaml") for k in keys), keys  # artifacts in S3
    # the password: not in the output, any file of the run (config.yaml, checkpoints, tracking state, queue),
    # the run's params and tags, nor in any artifact in the bucket
    assert PASSWORD not in out
    assert files_containing(out_dir, PASSWORD) == []
    assert all(PASSWORD not in v for v in {**run.data.params, **run.data.tags}.values())
    assert not any(PASSWORD.encode() in s3.boto().get_object(Bucket=server.bucket, Key=k)["Body"].read()
                   for k in keys)


def test_wrong_password_is_one_line_before_training(services, shards, tmp_path):
    _, _, server = services
    status, out, _ = cli(tiny(shards, tmp_path / "runs", "tracking.enabled=true",
                              f"tracking.tracking_uri={server.uri}"), timeout=300,
                         env=login_env("not-the-password-55"))
    assert status == 2, out[-3000:]
    line = one_error_line(out)
    assert f"MLflow server at {server.uri} refused the login (UNAUTHENTICATED)" in line
    assert "MLFLOW_TRACKING_PASSWORD" in line and "not-the-password-55" not in out
    assert "epoch 0" not in out and "[eval" not in out  # no step was trained, nothing evaluated
    checkpoints = tmp_path / "runs" / "t" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())


@pytest.fixture
def eval_result():
    """An evaluation of 40 random 8-d embeddings of 4 classes (metrics and the per-class table)."""
    import torch

    from trainer.evaluation.evaluate import EvalResult
    from trainer.evaluation.metrics import compute_metrics

    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.arange(40) % 4
    metrics, per_class = compute_metrics(x, y, nmi=False, class_names=[f"c{i}" for i in range(4)])
    return EvalResult(metrics, per_class, x, y, [f"k{i}" for i in range(40)])


def test_server_and_postgres_restarts_lose_no_event(services, tmp_path, login, monkeypatch, eval_result):
    """A run logging a metric per step (and an evaluation with its tables and pictures) while the server is
    stopped and started again, then while PostgreSQL is: every step arrives once, the queue empties, and the
    queue on disk never held the password."""
    s3, pg, server = services
    monkeypatch.setattr(sender, "RETRY_INTERVAL_S", 1.0)
    cfg = TrackingConfig(tracking_uri=server.uri, experiment="restarts")
    tracker = Tracker(cfg, tmp_path / "run", config={"data": {"root": "s3://b/p"}})
    step = 0

    def log(n):
        nonlocal step
        for _ in range(n):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
            step += 1
            time.sleep(0.05)

    log(5)
    assert tracker.flush(60) and tracker.online
    server.stop()
    log(5)
    tracker.log_evaluation(eval_result, step=step, epoch=1)
    assert tracker.flush(120) and not tracker.online and tracker.pending.exists()
    assert PASSWORD not in tracker.pending.read_text() and USER not in tracker.pending.read_text()
    server.start()
    log(5)
    assert tracker.flush(120) and tracker.online and not tracker.pending.exists()
    pg.down()
    log(5)
    assert tracker.flush(120) and not tracker.online and tracker.pending.exists()
    pg.up()
    log(5)
    tracker.close()
    assert not tracker.pending.exists()
    client = MlflowClient(server.uri)
    run_id = tracker.run_id
    assert [m.step for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == \
        list(range(25))
    assert "eval/recall_at_1" in client.get_run(run_id).data.metrics
    assert any(a.endswith("per_class_recall.csv") for a in all_artifacts(client, run_id))
    assert client.get_run(run_id).info.status == "FINISHED"
    assert files_containing(tmp_path / "run", PASSWORD) == []
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD  # the login came from the environment alone
