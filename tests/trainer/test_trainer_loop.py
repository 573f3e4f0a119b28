"""End-to-end training on tiny real shards (scikit-learn digits): one process, two gloo ranks, exact resume,
preemption by signal, resume on another world size."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from trainer import distributed
from trainer.build import build
from trainer.checkpoint import Checkpointer, load
from trainer.config import load_config
from trainer.model import build_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # the repository
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def tiny(shards, out, *more):
    """A seconds-long run: 8-channel CNN at 16 px, 2 epochs of 14 steps, deterministic."""
    return ["data.prepare=none", f"data.root={shards}", f"run.output_dir={out}", "run.name=t", "run.device=cpu",
            "run.deterministic=true", "data.num_workers=0", "model.small_cnn_width=8", "model.dim=16",
            "data.transform.image_size=16", "data.transform.resize_size=16", "train.epochs=2",
            "train.batch_size=64", "train.warmup_epochs=1", "optim.lr_milestones=[1]", "eval.every_epochs=1",
            "eval.at_start=false", "eval.nmi=false", "train.log_every_steps=5", "checkpoint.every_epochs=1",
            "tracking.enabled=false", *more]


def run_in_process(overrides):
    cfg = load_config("demo", overrides)
    env = distributed.setup("cpu")
    try:
        return build(cfg, env).fit()
    finally:
        distributed.teardown()
        torch.use_deterministic_algorithms(False)
        for k in DIST_VARS:
            os.environ.pop(k, None)


def final_weights(run_dir):
    state = Checkpointer(os.path.join(run_dir, "checkpoints")).load_latest()
    return state, {**{"model." + k: v for k, v in state["model"].items()},
                   **{"criterion." + k: v for k, v in state["criterion"].items()}}


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_single_process_trains_evaluates_and_checkpoints(shards, tmp_path):
    metrics = run_in_process(tiny(shards, tmp_path))
    assert {"recall_at_1", "recall_at_8"} <= set(metrics) and 0.0 < metrics["recall_at_1"] <= 1.0
    run_dir = tmp_path / "t"
    assert "small_cnn" in (run_dir / "config.yaml").read_text()
    state, _ = final_weights(run_dir)
    assert (state["epoch"], state["batch_in_epoch"], state["step"], state["world_size"]) == (2, 0, 28, 1)
    assert state["config"]["train"]["epochs"] == 2 and state["scheduler"]["last_epoch"] == 2


def test_interrupted_and_resumed_run_matches_uninterrupted(shards, tmp_path):
    run_in_process(tiny(shards, tmp_path / "full"))
    run_in_process(tiny(shards, tmp_path / "cut", "train.max_steps=19"))  # stops mid epoch 1
    state, _ = final_weights(tmp_path / "cut" / "t")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (1, 5, 19)
    run_in_process(tiny(shards, tmp_path / "cut"))  # resumes from the checkpoint of step 19
    full_state, full = final_weights(tmp_path / "full" / "t")
    cut_state, cut = final_weights(tmp_path / "cut" / "t")
    assert cut_state["step"] == full_state["step"] == 28
    assert full.keys() == cut.keys()
    for k in full:
        torch.testing.assert_close(cut[k], full[k], rtol=0, atol=0, msg=k)


def test_preemption_signal_leaves_a_usable_checkpoint(shards, tmp_path):
    log = tmp_path / "log.txt"
    args = [sys.executable, "-m", "trainer", "--config", "demo",
            *tiny(shards, tmp_path, "train.epochs=50", "train.warmup_epochs=0")]
    with open(log, "w") as f:
        proc = subprocess.Popen(args, cwd=ROOT, env=clean_env(), stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while "epoch 0:" not in log.read_text() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0, log.read_text()
    text = log.read_text()
    assert "checkpoint saved" in text, text
    state = load(Checkpointer(str(tmp_path / "t" / "checkpoints")).latest())
    assert 0 < state["step"] < 50 * 14
    r = subprocess.run(args[:-2] + ["train.epochs=2", "train.warmup_epochs=0"], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["gather", pytest.param("sharded", marks=pytest.mark.slow)])
def test_two_gloo_ranks_then_resume_on_one(shards, tmp_path, mode):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(distributed.free_port())]
    first = tiny(shards, tmp_path, "train.epochs=1", "train.warmup_epochs=0", f"loss.mode={mode}")
    r = subprocess.run(torchrun + ["-m", "trainer", "--config", "demo", *first], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state, _ = final_weights(tmp_path / "t")
    assert (state["epoch"], state["step"], state["world_size"]) == (1, 14, 2)  # global batch 64 = 2 x 32
    assert len(state["rng"]) == 2
    second = tiny(shards, tmp_path, "train.epochs=2", "train.warmup_epochs=0", f"loss.mode={mode}")
    r = subprocess.run([sys.executable, "-m", "trainer", "--config", "demo", *second], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "saved on 2 ranks, now 1" in r.stdout + r.stderr
    state, _ = final_weights(tmp_path / "t")
    assert (state["epoch"], state["step"], state["world_size"]) == (2, 28, 1)


def run_warmup_epoch(shards, tmp_path, *more):
    """The tiny run stopped at the end of its warm-up epoch (train.max_steps=14), in this process: the model's
    initial state dict (the Trainer's init: same seed, same order) and the last checkpoint."""
    overrides = tiny(shards, tmp_path, *more, "train.max_steps=14")
    cfg = load_config("demo", overrides)
    torch.manual_seed(cfg.run.seed)
    initial = build_model(cfg.model).state_dict()
    run_in_process(overrides)
    state, _ = final_weights(tmp_path / "t")
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 14)
    return initial, state


def test_warmup_epoch_trains_only_head_and_proxies(shards, tmp_path):
    initial, state = run_warmup_epoch(shards, tmp_path)
    for k, v in initial.items():
        if k.startswith("backbone.") and "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(state["model"][k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(state["model"]["embedding.weight"], initial["embedding.weight"])


@pytest.mark.slow
def test_demo_command(tmp_path):
    r = subprocess.run([sys.executable, "-m", "trainer", "--config", "trainer/configs/demo.yaml",
                        f"run.output_dir={tmp_path}"], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote 1797 scikit-learn digits" in r.stdout
    assert "test Recall@1:" in r.stdout + r.stderr and "before training ->" in r.stdout + r.stderr


def test_same_seed_same_run_in_every_loss_mode(shards, tmp_path):
    """One seed, one start in local, gather and sharded (one process: the same loss, computed three ways), so the
    runs agree: the proxies the checkpoint holds after a few steps, and the model."""
    weights = {}
    for mode in ("local", "gather", "sharded"):
        run_in_process(tiny(shards, tmp_path / mode, f"loss.mode={mode}", "train.warmup_epochs=0",
                            "train.max_steps=4"))
        weights[mode] = final_weights(tmp_path / mode / "t")[1]
    for mode in ("gather", "sharded"):
        assert weights[mode].keys() == weights["local"].keys()
        for k, v in weights["local"].items():
            torch.testing.assert_close(weights[mode][k], v, rtol=1e-4, atol=1e-5, msg=f"{mode}: {k}")
