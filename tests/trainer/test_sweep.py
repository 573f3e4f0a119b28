"""python -m trainer.sweep with real Optuna storages (a journal file) and a real MLflow store on the demo digits:
two workers on one study, a trial killed mid-run, a worker killed and the study resumed (with folds), pruning.
Each trial is a real trainer run of a few seconds; the tests take a minute or two each (slow)."""
import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
import yaml
from optuna.trial import TrialState

from trainer.config import load_config
from trainer.sweep import SweepError, open_storage, read_space

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SPACE = {"optim.lr": {"type": "float", "low": 1e-4, "high": 3e-3, "log": True},
         "loss.scale": {"type": "categorical", "choices": [1.0, 4.0]}}


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    from trainer.demo import write_digits_shards
    root = str(tmp_path_factory.mktemp("digits-val"))
    write_digits_shards(root, val_classes=["1", "3"])
    return root


def overrides(shards, epochs=2):
    return ["data.prepare=none", f"data.root={shards}", "data.val_split=val", "data.num_workers=0",
            "model.small_cnn_width=8", "model.dim=16", "loss.proxies_per_class=1", "loss.r=1.0",
            "data.transform.image_size=16", "data.transform.resize_size=16", f"train.epochs={epochs}",
            "eval.every_epochs=1", "eval.at_start=false", "eval.nmi=false", "tracking.log_every_steps=0",
            "tracking.retrieval_grid_queries=0"]


def start(tmp_path, shards, *extra, trials=3, study="s", epochs=2, space=SPACE):
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS and not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "trainer.sweep", "--config", "demo", "--space", str(space_file), "--trials",
           str(trials), "--storage", str(tmp_path / "study.journal"), "--study", study, "--out",
           str(tmp_path / "out"), "--pruner", "none", *extra, *overrides(shards, epochs)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def load(tmp_path, study="s"):
    return optuna.load_study(study_name=study, storage=open_storage(str(tmp_path / "study.journal")))


def wait_running(tmp_path, key="sweep.pid", timeout=300):
    """The first RUNNING trial that has `key` among its user attrs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            for t in load(tmp_path).get_trials(states=(TrialState.RUNNING,)):
                if key in t.user_attrs:
                    return t
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.5)
    raise AssertionError("no running trial")


def test_space_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lr: {type: float, low: 0, high: 1, log: true}\n")
    with pytest.raises(SweepError, match="optim.lr: log needs low > 0"):
        read_space(str(bad))
    bad.write_text("optim.lr: {type: float, low: 1e-5, high: 1e-3, log: true}\n")  # YAML 1.1: "1e-5" is a string
    assert read_space(str(bad))["optim.lr"]["low"] == 1e-5
    bad.write_text("optim.lr: {type: normal}\n")
    with pytest.raises(SweepError, match="'type' must be"):
        read_space(str(bad))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_workers_share_one_study_nested_in_mlflow(val_shards, tmp_path):
    a = start(tmp_path, val_shards, "--seed", "1")
    b = start(tmp_path, val_shards, "--seed", "2")
    (code_a, out_a), (code_b, out_b) = finish(a), finish(b)
    assert code_a == 0 and code_b == 0, out_a[-2000:] + out_b[-2000:]
    trials = load(tmp_path).get_trials()
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    workers = {t.user_attrs["sweep.worker"] for t in trials}
    assert len(workers) == 2  # both worked on it
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'trials' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("proxygml").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep.study") == "s"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["s-t0000", "s-t0001", "s-t0002"]
    for t in trials:  # the trial's value is the best val MAP@R its run logged
        (run,) = [r for r in children if r.info.run_name == f"s-t{t.number:04d}"]
        history = client.get_metric_history(run.info.run_id, "val/map_at_r")
        assert t.value == pytest.approx(max(m.value for m in history))
        assert not client.get_metric_history(run.info.run_id, "test/map_at_r")  # the test classes untouched
    best = max(trials, key=lambda t: t.value)
    cfg = load_config(str(tmp_path / "out" / "best.yaml"))
    assert cfg.optim.lr == pytest.approx(best.params["optim.lr"]) and \
        cfg.loss.proxygml.scale == best.params["loss.scale"]
    assert cfg.train.epochs == 2 and cfg.data.val_split == "val"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_trial_fails_and_the_study_goes_on(val_shards, tmp_path):
    proc = start(tmp_path, val_shards, trials=2, epochs=3)
    victim = wait_running(tmp_path)
    os.kill(victim.user_attrs["sweep.pid"], signal.SIGKILL)  # the trainer of the trial, mid-run
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    trials = load(tmp_path).get_trials()
    states = {t.number: t.state for t in trials}
    assert states[victim.number] == TrialState.FAIL and "exit -9" in trials[victim.number].user_attrs["sweep.failed"]
    assert sum(s == TrialState.COMPLETE for s in states.values()) == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_killed_worker_then_resumed_study_with_folds(val_shards, tmp_path):
    proc = start(tmp_path, val_shards, "--folds", "2", trials=2)
    victim = wait_running(tmp_path)
    trainer_pid = victim.user_attrs["sweep.pid"]
    proc.send_signal(signal.SIGKILL)  # the whole worker: its trial stays RUNNING in the storage
    proc.communicate(timeout=60)
    deadline = time.time() + 90
    while time.time() < deadline and os.path.exists(f"/proc/{trainer_pid}"):  # its trainer stops with it
        time.sleep(0.5)
    assert not os.path.exists(f"/proc/{trainer_pid}")
    assert load(tmp_path).trials[victim.number].state == TrialState.RUNNING
    code, out = finish(start(tmp_path, val_shards, "--folds", "2", trials=2))  # the same study, started again
    assert code == 0, out[-3000:]
    assert "continuing" in out and f"trial {victim.number}: its worker" in out
    trials = load(tmp_path).get_trials()
    assert trials[victim.number].state == TrialState.FAIL
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == 2
    for t in done:  # the mean of the folds' best val values
        folds = t.user_attrs["fold_values"]
        assert len(folds) == 2 and t.value == pytest.approx(sum(folds) / 2)
    fold_dirs = sorted(os.listdir(tmp_path / "out" / "folds" / "k2-seed0"))
    assert fold_dirs[:2] == ["fold-0", "fold-1"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pruning_stops_a_worse_trial(val_shards, tmp_path):
    enqueue = tmp_path / "enqueue.yaml"  # trial 0 learns; trial 1 (all learning rates 0) stays at the initial
    keys = ("optim.lr", "optim.head_lr", "optim.proxy_lr")  # val MAP@R, below trial 0's from epoch 1 on
    enqueue.write_text(yaml.safe_dump([dict.fromkeys(keys, 0.003), dict.fromkeys(keys, 0.0)]))
    space = {k: {"type": "categorical", "choices": [0.0, 0.003]} for k in keys}
    proc = start(tmp_path, val_shards, "--enqueue", str(enqueue), "--pruner", "median", "--pruner-startup-trials",
                 "1", "--pruner-warmup-steps", "0", trials=2, epochs=3, space=space)
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    t0, t1 = load(tmp_path).get_trials()
    assert t0.state == TrialState.COMPLETE and t1.state == TrialState.PRUNED, out[-2000:]
    assert max(t1.intermediate_values) < 3  # stopped before its last epoch
    assert "pruned at fold 0 epoch 1" in out
