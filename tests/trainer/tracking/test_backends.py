"""Tracking backends: a new one is one file (tests/trainer/tracking/toy_backend.py) and one registration line, and a
real training run then logs to it beside MLflow, keeps its run id in the checkpoint and resumes the same run;
`tracking.backends` is checked before any work; a queue of the earlier layout (tracking/pending.jsonl) still goes
to MLflow."""
from __future__ import annotations

import json

import mlflow
import pytest

from tests.trainer.test_trainer_loop import run_in_process, tiny
from tests.trainer.tracking.toy_backend import FILE, ToyBackend, read_events
from trainer.checkpoint import Checkpointer
from trainer.config import ConfigError, load_config
from trainer.tracking import backends, register_backend, unregister_backend, upload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture
def toy():
    register_backend("toy", ToyBackend)
    yield
    unregister_backend("toy")


@pytest.fixture(autouse=True)
def no_mlflow_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)


def loss_steps(events: list[dict], run_id: str) -> list[int]:
    return [e["step"] for e in events
            if e["op"] == "metrics" and e["run_id"] == run_id and "Train/loss" in e["metrics"]]


def test_a_training_run_logs_to_a_registered_toy_backend_and_resumes_its_run(toy, shards, tmp_path):
    track = ["tracking.enabled=true", "tracking.backends=[mlflow,toy]", "tracking.log_every_steps=1",
             "tracking.retrieval_grid_queries=0"]
    run_in_process(tiny(shards, tmp_path, *track, "train.max_steps=14"))  # the first epoch, then stopped
    run_dir = tmp_path / "t"
    checkpoints = Checkpointer(str(run_dir / "checkpoints"))
    first = checkpoints.load_latest()["tracker_run_ids"]
    events = read_events(run_dir / FILE)
    assert set(first) == {"mlflow", "toy"} and [e["run_id"] for e in events if e["op"] == "run"] == [first["toy"]]
    params = {k: v for e in events if e["op"] == "params" for k, v in e["params"].items()}
    assert params["train.epochs"] == "2" and params["tracking.backends"] == '["mlflow", "toy"]'
    assert loss_steps(events, first["toy"]) == list(range(1, 15))  # the loss of every step
    assert [e["status"] for e in events if e["op"] == "end"] == ["KILLED"]  # stopped before its last epoch

    run_in_process(tiny(shards, tmp_path, *track))  # resumed from the checkpoint of step 14: the same runs go on
    assert checkpoints.load_latest()["tracker_run_ids"] == first
    events = read_events(run_dir / FILE)
    assert [e["run_id"] for e in events if e["op"] == "run"] == [first["toy"]] * 2
    assert loss_steps(events, first["toy"]) == list(range(1, 29))
    assert [e["status"] for e in events if e["op"] == "end"] == ["KILLED", "FINISHED"]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # MLflow got the same steps
    assert sorted(m.step for m in client.get_metric_history(first["mlflow"], "Train/loss")) == list(range(1, 29))
    assert not (run_dir / "tracking" / "toy" / "pending.jsonl").exists()
    assert json.loads((run_dir / "tracking" / "toy" / "state.json").read_text())["run_id"] == first["toy"]


def test_only_registered_backends_are_accepted_before_any_work(toy, tmp_path):
    assert load_config("demo", ["tracking.backends=[toy]"]).tracking.backends == ["toy"]
    assert list(backends())[0] == "mlflow" and list(backends())[-1] == "toy"  # in registration order
    with pytest.raises(ConfigError, match=r"^tracking.backends: 'wandb' is not a registered tracking backend "
                                          r"\(registered: mlflow, toy\)"):
        load_config("demo", ["tracking.backends=[mlflow,wandb]"])
    with pytest.raises(ConfigError, match="^tracking.backends: .* twice"):
        load_config("demo", ["tracking.backends=[toy,toy]"])
    with pytest.raises(ConfigError, match="^tracking.backends: empty"):
        load_config("demo", ["tracking.backends=[]"])
    with pytest.raises(ValueError, match=r"already registered \(ToyBackend\)"):
        register_backend("toy", type("Other", (ToyBackend,), {}))


def test_a_queue_of_the_earlier_layout_still_uploads_to_mlflow(tmp_path):
    """tracking/state.json with the MLflow run, tracking/pending.jsonl: as runs of earlier versions left them while
    their store was unreachable (no run created yet). The upload moves them to tracking/mlflow/ and sends them."""
    run_dir = tmp_path / "old"
    tdir = run_dir / "tracking"
    (tdir / "artifacts" / "config").mkdir(parents=True)
    (tdir / "artifacts" / "config" / "config.yaml").write_text("train:\n  epochs: 2\n")
    (tdir / "state.json").write_text(json.dumps({
        "tracking_uri": "http://127.0.0.1:9", "experiment": "earlier", "run_name": "old", "run_id": None,
        "eval_history": [[5, {"1": 0.5, "2": 0.75}]]}, indent=1))
    events = [{"op": "tags", "tags": {"sys.world_size": "1"}},
              {"op": "params", "params": {"train.epochs": "2"}},
              {"op": "artifacts", "local": str(tdir / "artifacts" / "config"), "artifact_path": None},
              *({"op": "metrics", "step": s, "timestamp": 1_700_000_000_000 + s, "metrics": {"loss": 1.0 / s}}
                for s in range(1, 6)),
              {"op": "end", "status": "FINISHED", "timestamp": 1_700_000_000_010}]
    (tdir / "pending.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    db = f"sqlite:///{tmp_path / 'later.db'}"
    run_id = upload(run_dir, db)["mlflow"]
    run = mlflow.MlflowClient(db).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.epochs": "2"}
    assert sorted(m.step for m in mlflow.MlflowClient(db).get_metric_history(run_id, "loss")) == [1, 2, 3, 4, 5]
    assert [a.path for a in mlflow.MlflowClient(db).list_artifacts(run_id)] == ["config.yaml"]
    assert not (tdir / "pending.jsonl").exists() and not (tdir / "mlflow" / "pending.jsonl").exists()
    assert json.loads((tdir / "mlflow" / "state.json").read_text())["run_id"] == run_id
    assert json.loads((tdir / "state.json").read_text()) == {"eval_history": [[5, {"1": 0.5, "2": 0.75}]]}


@pytest.mark.timeout(120)
def test_an_upload_to_a_store_that_does_not_answer_is_one_line_and_keeps_the_queue(tmp_path, monkeypatch, capsys):
    from tests.helpers import free_port
    from trainer.tracking import main
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    queue = tmp_path / "run" / "tracking" / "mlflow"
    queue.mkdir(parents=True)
    (queue.parent / "state.json").write_text("{}")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    (queue / "state.json").write_text(json.dumps({"tracking_uri": uri, "experiment": "e", "run_name": "r",
                                                  "run_id": None}))
    event = {"op": "metrics", "step": 1, "timestamp": 1_700_000_000_000, "metrics": {"loss": 0.5}}
    (queue / "pending.jsonl").write_text(json.dumps(event) + "\n")
    assert main(["upload", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: upload: MLflow at {uri} did not take the events"), err
    assert json.loads((queue / "pending.jsonl").read_text()) == event  # kept for the next try
