"""A new loss family with a class-sharded table is one file and one registration line: the toy center loss
(tests/trainer/toy_centers.py) trains on 2 gloo ranks with its `centers` cut by classes, is saved as each rank's
block (DCP), and resumes on 1 and on 3 ranks with exactly the saved table and Adam moments; also from a .pt
checkpoint, and in its replicated mode."""
import shutil

import pytest
import torch

from tests.helpers import run_on_gloo_ranks
from tests.trainer.test_trainer_loop import tiny
from trainer.checkpoint import Checkpointer, load

STEPS = 4  # the first run stops (and saves) here; the resumed ones go on to STEPS + 2


def _overrides(shards, out, mode, fmt, steps):
    return tiny(shards, out, "loss.family=centers", f"loss.mode={mode}", f"checkpoint.format={fmt}",
                "train.batch_size=48", "train.warmup_epochs=0", f"train.max_steps={steps}", "eval.every_epochs=0")


def _train(rank, world, shards, out, mode, fmt, steps):
    """One rank of a run; returns the whole centers table and its Adam moments as restored (before training)."""
    from loss.family import register_family
    from tests.trainer.toy_centers import CentersFamily
    register_family(CentersFamily())  # the one line
    from trainer import distributed
    from trainer.build import build
    from trainer.config import load_config

    cfg = load_config("demo", _overrides(shards, out, mode, fmt, steps))
    trainer = build(cfg, distributed.setup("cpu"))
    parts = trainer.parts.trained.parts
    table = parts["criterion"].full_state()["centers"]
    optim = parts["optimizer"].full_state()
    moments = {k: v for st in optim["state"].values() for k, v in st.items()
               if torch.is_tensor(v) and v.shape[:1] == table.shape[:1]}
    block = tuple(trainer.parts.trained.criterion.centers.shape)
    trainer.fit()
    return dict(table=table, moments=moments, block=block, step=trainer.pos.step)


def _run(world, *args):
    return run_on_gloo_ranks(_train, world, *map(str, args[:2]), *args[2:], timeout=240)


@pytest.mark.distributed
@pytest.mark.parametrize("fmt", ["dcp", pytest.param("torch", marks=pytest.mark.slow)])
def test_sharded_table_saved_on_two_ranks_resumes_on_one_and_three(shards, tmp_path, fmt):
    first = _run(2, shards, tmp_path / "two", "sharded", fmt, STEPS)
    assert [r["block"] for r in first] == [(3, 16), (2, 16)]  # 5 classes: blocks of 3 and 2
    saved = load(Checkpointer(str(tmp_path / "two" / "t" / "checkpoints")).latest())
    assert saved["step"] == STEPS and saved["world_size"] == 2
    table = saved["criterion"]["centers"]
    assert table.shape == (5, 16) and not torch.equal(table, first[0]["table"])  # it trained
    for world in (1, 3):
        out = tmp_path / f"on{world}"
        shutil.copytree(tmp_path / "two", out)
        resumed = _run(world, shards, out, "sharded", fmt, STEPS + 2)
        for r in resumed:  # every rank restored exactly the saved table and moments, in its own blocks
            torch.testing.assert_close(r["table"], table, rtol=0, atol=0)
            assert set(r["moments"]) == {"exp_avg", "exp_avg_sq"}
            assert r["step"] == STEPS + 2
        assert [r["block"][0] for r in resumed] == ([5] if world == 1 else [2, 2, 1])
        state = load(Checkpointer(str(out / "t" / "checkpoints")).latest())
        assert state["step"] == STEPS + 2 and state["world_size"] == world


@pytest.mark.distributed
@pytest.mark.slow
def test_replicated_mode_of_the_toy_family_trains_and_resumes(shards, tmp_path):
    first = _run(2, shards, tmp_path, "local", "dcp", STEPS)
    assert [r["block"] for r in first] == [(5, 16), (5, 16)]
    saved = load(Checkpointer(str(tmp_path / "t" / "checkpoints")).latest())["criterion"]["centers"]
    resumed = _run(1, shards, tmp_path, "local", "dcp", STEPS + 2)
    torch.testing.assert_close(resumed[0]["table"], saved, rtol=0, atol=0)
