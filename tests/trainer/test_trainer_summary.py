"""What a run prints on rank 0: the start summary, the end summary (matched against the MLflow store and the
checkpoint), and a finished run started again (already complete: nothing trained, its metrics, a new name)."""
import os
import re
import subprocess
import sys

import mlflow

from trainer.checkpoint import Checkpointer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_trainer(shards, out, *more):
    args = ["--config", "demo", "data.prepare=none", f"data.root={shards}", f"run.output_dir={out}", "run.name=t",
            "data.num_workers=0", "model.small_cnn_width=8", "model.dim=16", "data.transform.image_size=16",
            "data.transform.resize_size=16", "train.epochs=2", "train.warmup_epochs=0", "eval.every_epochs=1",
            "eval.at_start=true", "eval.nmi=false", "tracking.log_every_steps=0", "tracking.retrieval_grid_queries=0",
            *more]
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def test_start_and_end_summary_then_already_complete(shards, tmp_path):
    text = run_trainer(shards, tmp_path)
    assert re.search(r"run t: ProxyGML \(gather, 4 proxies/class, r 0\.25, lam 0\.3\) on the digits shards at "
                     r"\S+ \(train 901 images / 5 classes, test 896 / 5\)", text), text
    assert "small_cnn -> 16-d embedding; 1 rank(s) on cpu, engine ddp; 2 epochs x 14 steps of 64 = 28 steps" in text
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("proxygml").experiment_id])
    assert run.info.status == "FINISHED"
    r1 = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "eval/recall_at_1"),
                                  key=lambda m: m.step)]
    map_r = client.get_metric_history(run.info.run_id, "eval/map_at_r")
    final_map = max(map_r, key=lambda m: m.step).value
    assert len(r1) == 3  # before training, epochs 1 and 2
    end = text[text.index("run t finished: 2 epochs, 28 steps"):]
    assert f"final Recall@1 {r1[-1]:.4f}, MAP@R {final_map:.4f} (epoch 2, step 28) (before training {r1[0]:.4f})" \
        in end, end
    best = max(r1)  # the evaluation before training counts too (epoch 0): a run that got worse says so
    assert re.search(rf"best  Recall@1 {best:.4f}, MAP@R [\d.]+ \(epoch [012], step (0|14|28)\)", end), end
    latest = tmp_path / "t" / "checkpoints" / "step-000000028"  # a DCP folder (checkpoint.format=dcp)
    assert f"checkpoint     {latest}" in end and f"config         {tmp_path / 't' / 'config.yaml'}" in end
    assert f"run {run.info.run_id}, experiment 'proxygml', store {uri}" in end
    assert f"mlflow ui --backend-store-uri {uri}" in end

    mtime = latest.stat().st_mtime
    again = run_trainer(shards, tmp_path)
    assert "run t is already complete: epoch 2 of 2, step 28; nothing to train" in again, again
    assert f"final Recall@1 {r1[-1]:.4f}" in again and "run.name=t-2" in again
    assert "[eval " not in again and "epoch 0:" not in again  # nothing trained nor evaluated
    assert latest.stat().st_mtime == mtime and len(Checkpointer(str(latest.parent)).paths()) <= 3
    (run,) = client.search_runs([client.get_experiment_by_name("proxygml").experiment_id])
    assert run.info.status == "FINISHED"
