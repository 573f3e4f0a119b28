"""Several runs sharing one fresh SQLite MLflow store: the store is created once, every run is tracked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[3]  # the repository
STEPS = 20

# One short run: a Tracker on the default store beside the run directory, STEPS steps of two metrics.
RUN = f"""
import sys, time
from trainer.config import TrackingConfig
from trainer.tracking import Tracker
t = Tracker(TrackingConfig(experiment="together"), sys.argv[1], config={{"name": sys.argv[1]}}, world_size=1)
for step in range({STEPS}):
    t.log_metrics({{"loss": 1.0 / (step + 1), "img_per_s": 100.0 + step}}, step)
    time.sleep(0.02)
t.close("FINISHED")
print("run", t.run_id)
"""


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_four_runs_started_together_on_a_fresh_store_are_all_tracked(tmp_path):
    runs = tmp_path / "runs"
    procs = [subprocess.Popen([sys.executable, "-c", RUN, str(runs / f"r{i}")], cwd=ROOT, env=clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)[-4000:]
    assert not any("failed" in o for o in outs), "\n".join(outs)[-4000:]  # no run took the race for an outage
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.info.run_name for r in found) == ["r0", "r1", "r2", "r3"]
    for run in found:
        assert run.info.status == "FINISHED"
        for key in ("loss", "img_per_s"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(STEPS))
        assert not (runs / run.info.run_name / "tracking" / "mlflow" / "pending.jsonl").exists()


@pytest.mark.slow
def test_four_trainer_runs_started_together_on_a_fresh_store(shards, tmp_path):
    """The real thing: four demo trainings of a few seconds, one new store."""
    out = tmp_path / "runs"
    common = ["--config", "demo", "data.prepare=none", f"data.root={shards}", f"run.output_dir={out}",
              "data.num_workers=0", "model.small_cnn_width=8", "model.dim=16", "data.transform.image_size=16",
              "data.transform.resize_size=16", "train.epochs=1", "train.warmup_epochs=0", "eval.at_start=false",
              "eval.nmi=false", "tracking.log_every_steps=2", "tracking.experiment=together"]
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "trainer", *common, f"run.name=t{i}"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)[-4000:]
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    found = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert sorted(r.info.run_name for r in found) == ["t0", "t1", "t2", "t3"]
    for run in found:
        assert run.info.status == "FINISHED"
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
        assert set(range(2, 15, 2)) <= steps  # every tracking.log_every_steps (and the progress bar's steps)
        assert "eval/recall_at_1" in run.data.metrics
