"""Checkpointer: atomic files, last K kept, latest found; RNG states round-trip."""
import os
import random

import pytest
import torch

from trainer.checkpoint import REQUIRED, Checkpointer, CheckpointError, load, rng_state, set_rng_state


def state_of(step, **more):
    """A dict with every key a trainer checkpoint has (load() checks them)."""
    return {**{k: None for k in REQUIRED}, "step": step, **more}


def test_keep_last_and_latest(tmp_path):
    ck = Checkpointer(str(tmp_path / "ck"), keep_last=2)
    assert ck.latest() is None and ck.load_latest() is None
    for step in (5, 10, 15):
        ck.save(state_of(step, w=torch.full((3,), float(step))), step)
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == ["step-000000010.json", "step-000000010.pt", "step-000000015.json",
                     "step-000000015.pt"]  # no temp files left, oldest deleted with its sidecar
    assert ck.load_latest()["step"] == 15


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    ck = Checkpointer(str(tmp_path), keep_last=3)
    ck.save(state_of(1), 1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ck.save(state_of(2, bad=Unpicklable()), 2)
    assert sorted(os.listdir(tmp_path)) == ["step-000000001.json", "step-000000001.pt"]
    assert load(ck.latest())["step"] == 1


def test_rng_round_trip():
    state = rng_state()
    a = (random.random(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


@pytest.mark.parametrize("run_id,expected", [("abc123", {"mlflow": "abc123"}), (None, {})])
def test_a_checkpoint_with_the_old_mlflow_run_id_reads_as_tracker_run_ids(tmp_path, run_id, expected):
    ck = Checkpointer(str(tmp_path))
    ck.save(state_of(3, mlflow_run_id=run_id), 3)
    state = load(ck.latest())
    assert state["tracker_run_ids"] == expected and "mlflow_run_id" not in state


def test_when_every_checkpoint_is_damaged_the_next_start_refuses_too(tmp_path):
    ck = Checkpointer(str(tmp_path))
    ck.save(state_of(4), 4)
    path = ck.latest()
    with open(path, "r+b") as f:  # garbled in the middle: its sha256 no longer matches
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\xff" * 16)
    for _ in range(2):  # the first start sets it aside, the next one still finds nothing to resume
        with pytest.raises(CheckpointError, match="every checkpoint .* is damaged .*step-000000004.pt.damaged"):
            ck.find_latest(log=lambda line: None)
    assert ck.paths() == []
