"""Model selection on the val split: the best checkpoint by the val metric is kept (and survives a resume), the
test split is evaluated once at the end on it, both clearly labelled in summary.json and MLflow; config checks."""
import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.selection import BEST_FILE, BestCheckpoint
from trainer.train_state import Position

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="session")
def val_shards(tmp_path_factory):
    """The demo's digits with a val split: train 0, 2, 4; val 1, 3 (taken out of train); test 5-9."""
    from trainer.demo import write_digits_shards
    root = str(tmp_path_factory.mktemp("digits-val"))
    write_digits_shards(root, val_classes=["1", "3"])
    return root


def test_best_checkpoint_keeps_the_best_and_resumes(tmp_path):
    lines = []
    best = BestCheckpoint(str(tmp_path), "map_at_r", is_main=True, log=lines.append)
    model = torch.nn.Linear(3, 2)
    kept = None
    for step, value in enumerate([0.5, 0.7, 0.7, 0.6], start=1):
        with torch.no_grad():
            model.weight.fill_(float(step))
        if best.consider({"map_at_r": value, "recall_at_1": 0.1 * step}, Position(step, 0, step * 10), model):
            kept = step
    assert kept == 2 and best.value == 0.7  # a tie keeps the earlier evaluation
    assert sum("best val MAP@R" in ln for ln in lines) == 2
    again = BestCheckpoint(str(tmp_path), "map_at_r", is_main=True, log=lines.append, step=40)  # a resumed run
    assert again.value == 0.7 and again.record["epoch"] == 2
    fresh = torch.nn.Linear(3, 2)
    record = again.load_into(fresh)
    assert record["step"] == 20 and torch.equal(fresh.weight, torch.full((2, 3), 2.0))
    earlier = BestCheckpoint(str(tmp_path), "map_at_r", is_main=True, log=lines.append, step=10)
    assert earlier.value is None  # resumed from before that evaluation: chosen afresh
    assert not BestCheckpoint(str(tmp_path), "map_at_r", is_main=False, log=lines.append).consider(
        {"map_at_r": 0.9}, Position(9, 0, 90), model)  # only rank 0 decides and writes


def test_config_rules_of_the_val_split():
    base = ["data.root=x"]
    load_config("demo", [*base, "data.val_split=val", "eval.select_metric=recall_at_2"])
    with pytest.raises(ConfigError, match="eval.select_metric"):
        load_config("demo", [*base, "data.val_split=val", "eval.select_metric=recall_at_3"])
    with pytest.raises(ConfigError, match="eval.select_metric.*turned off"):
        load_config("demo", [*base, "data.val_split=val", "eval.map_r=false"])
    with pytest.raises(ConfigError, match="eval.test"):
        load_config("demo", [*base, "eval.test=false"])
    with pytest.raises(ConfigError, match="data.val_split"):
        load_config("demo", [*base, "data.val_split=test"])
    load_config("demo", [*base, "eval.map_r=false"])  # no val split: as before


def test_run_with_val_split_selects_on_val_and_tests_once(val_shards, tmp_path):
    args = ["--config", "demo", "data.prepare=none", f"data.root={val_shards}", f"run.output_dir={tmp_path}",
            "run.name=v", "data.num_workers=0", "model.small_cnn_width=8", "model.dim=16", "loss.proxies_per_class=1",
            "loss.r=1.0", "optim.lr=0.002", "optim.head_lr=0.002", "data.transform.image_size=16",
            "data.transform.resize_size=16", "train.epochs=3", "eval.every_epochs=1", "eval.at_start=true",
            "data.val_split=val", "tracking.log_every_steps=0", "tracking.retrieval_grid_queries=0"]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(tmp_path / "v" / "summary.json") as f:
        summary = json.load(f)
    vals = [e for e in summary["evaluations"] if e["split"] == "val"]
    tests = [e for e in summary["evaluations"] if e["split"] == "test"]
    assert [e["epoch"] for e in vals] == [0, 1, 2, 3] and len(tests) == 1  # the test split: once, at the end
    best = max(vals, key=lambda e: (e["metrics"]["map_at_r"], -e["step"]))
    assert summary["selected"]["epoch"] == best["epoch"] and summary["selected"]["value"] == best["metrics"]["map_at_r"]
    saved = torch.load(tmp_path / "v" / "checkpoints" / BEST_FILE, weights_only=True)
    assert saved["step"] == best["step"]
    text = r.stdout + r.stderr
    assert f"best MAP@R {best['metrics']['map_at_r']:.4f} at epoch {best['epoch']}" in text
    assert "test (evaluated once, on that checkpoint)" in text and ", val 365 / 2)" in text
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("proxygml").experiment_id])
    history = client.get_metric_history(run.info.run_id, "val/map_at_r")
    assert sorted(m.value for m in history) == sorted(e["metrics"]["map_at_r"] for e in vals)
    (test_r1,) = client.get_metric_history(run.info.run_id, "test/recall_at_1")
    assert test_r1.value == pytest.approx(tests[0]["metrics"]["recall_at_1"])
    assert not client.get_metric_history(run.info.run_id, "eval/recall_at_1")  # nothing unlabelled
