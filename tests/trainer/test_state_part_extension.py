"""A new piece of training state is one file and one registration line: the toy EMA part (tests/trainer/toy_ema.py)
is saved in both checkpoint formats by a real training run, and an interrupted and resumed run ends with exactly
the EMA of an uninterrupted one (a part not restored would restart its average at the resume)."""
import pytest
import torch

from tests.trainer.test_trainer_loop import final_weights, run_in_process, tiny
from trainer.checkpoint import Checkpointer, load
from trainer.state_parts import register_state_part, unregister_state_part


@pytest.fixture
def ema_registered():
    from tests.trainer.toy_ema import EMAPart
    register_state_part(EMAPart)  # the one line
    yield
    unregister_state_part("ema")


def test_a_registered_part_is_saved_and_resumed_exactly_in_both_formats(shards, tmp_path, ema_registered):
    run_in_process(tiny(shards, tmp_path / "full"))
    full, _ = final_weights(tmp_path / "full" / "t")
    ema = full["ema"]
    assert set(ema) == {k for k, v in full["model"].items() if v.is_floating_point()}
    moved = [k for k in ema if not torch.equal(ema[k], full["model"][k])]
    assert moved, "the EMA equals the weights: it was never averaged"
    for fmt in ("torch", "dcp"):
        run = tmp_path / fmt
        run_in_process(tiny(shards, run, f"checkpoint.format={fmt}", "train.max_steps=19"))
        run_in_process(tiny(shards, run, f"checkpoint.format={fmt}"))  # resumes at step 19
        cut, _ = final_weights(run / "t")
        assert cut["step"] == full["step"] == 28
        for k in ema:  # exactly the uninterrupted run's average: it was saved at step 19 and restored
            torch.testing.assert_close(cut["ema"][k], ema[k], rtol=0, atol=0, msg=f"{fmt}: {k}")


def test_a_checkpoint_written_before_the_part_existed_resumes_with_it_fresh(shards, tmp_path):
    run_in_process(tiny(shards, tmp_path, "train.max_steps=19"))  # no EMA part registered
    assert "ema" not in load(Checkpointer(str(tmp_path / "t" / "checkpoints")).latest())
    from tests.trainer.toy_ema import EMAPart
    register_state_part(EMAPart)
    try:
        run_in_process(tiny(shards, tmp_path))
    finally:
        unregister_state_part("ema")
    state, _ = final_weights(tmp_path / "t")
    assert state["step"] == 28 and set(state["ema"]) and all(torch.isfinite(v).all() for v in state["ema"].values())
