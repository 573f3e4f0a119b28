"""Results that looked fine but meant nothing (issue 25, items 8, 9 and 11): a test split of one class, an
evaluation on the classes the checkpoint trained on, and compute_metrics on arrays with negative strides."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.trainer.test_trainer_loop import clean_env, run_in_process, tiny

pytestmark = pytest.mark.timeout(240)


def test_a_test_split_of_one_class_is_refused_at_start(tmp_path):
    from data_shards import write_dataset
    from trainer.demo import write_digit_folders
    src = tmp_path / "digits"
    write_digit_folders(str(src))
    write_dataset("folder", str(src), str(tmp_path / "shards"), train_classes=["0", "1", "2"], test_classes=["5"],
                  shard_size="64KB", progress=False)
    p = subprocess.run([sys.executable, "-m", "trainer", *tiny(str(tmp_path / "shards"), tmp_path / "runs")],
                       capture_output=True, text=True, timeout=150, env=clean_env())
    said = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in said, said[-3000:]
    errors = [ln for ln in said.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "data.test_split" in errors[0] and "1 class" in errors[0], said[-3000:]
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()  # refused before any work


def recall_at_1_float64(x, labels):
    """Recall@1 by brute force in float64: the nearest other row (cosine) has the query's label."""
    x = np.asarray(x, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.mean(np.asarray(labels)[sim.argmax(1)] == np.asarray(labels)))


def test_compute_metrics_takes_arrays_with_negative_strides():
    from trainer.evaluation import compute_metrics
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 8)).astype(np.float32)
    labels = np.repeat(np.arange(6), 10)
    emb[:, 0] += labels * 2.0  # some structure: recall well above chance
    rev, rev_labels = emb[::-1], labels[::-1]  # negative strides (a view)
    assert rev.strides[0] < 0
    metrics, _ = compute_metrics(rev, rev_labels, recall_ks=(1, 2), nmi=False, map_r=True)
    assert metrics["recall_at_1"] == pytest.approx(recall_at_1_float64(rev, rev_labels), abs=1e-6)
    plain, _ = compute_metrics(np.ascontiguousarray(rev), rev_labels.copy(), recall_ks=(1, 2), nmi=False, map_r=True)
    assert metrics == pytest.approx(plain)
    cols, _ = compute_metrics(np.asfortranarray(emb)[:, ::-1], labels, recall_ks=(1,), nmi=False, map_r=False)
    assert cols["recall_at_1"] == pytest.approx(recall_at_1_float64(emb[:, ::-1], labels), abs=1e-6)


@pytest.mark.parametrize("fmt", ["torch", pytest.param("dcp", marks=pytest.mark.slow)])
def test_evaluating_on_the_classes_a_checkpoint_trained_on_warns(shards, tmp_path, fmt):
    run_in_process(tiny(shards, tmp_path, "train.max_steps=3", f"checkpoint.format={fmt}"))
    ckpt = os.path.join(tmp_path, "t", "checkpoints", "step-000000003" + (".pt" if fmt == "torch" else ""))
    said = {}
    for split in ("train", "test"):
        p = subprocess.run([sys.executable, "-m", "trainer.evaluate", ckpt, "--data", os.path.join(shards, split),
                            "--num-workers", "0"], capture_output=True, text=True, timeout=150, env=clean_env())
        assert p.returncode == 0, p.stderr[-3000:]
        said[split] = p.stderr
    warning = [ln for ln in said["train"].splitlines() if ln.startswith("warning:") and "trained on" in ln]
    assert len(warning) == 1 and "5 of the 5 classes" in warning[0], said["train"][-3000:]
    assert "trained on" not in said["test"]
