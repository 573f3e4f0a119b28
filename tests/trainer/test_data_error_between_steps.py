"""A user error met between steps (the train shards deleted while the run trains) writes a checkpoint first, like
SIGTERM, and says so (issue 25, item 6): a real `python -m trainer` with a loader worker."""
import glob
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.trainer.test_stop_signals import Trainer
from tests.trainer.test_trainer_loop import tiny

pytestmark = pytest.mark.timeout(240)


def test_shards_deleted_mid_run_checkpoint_first_then_one_line(shards, tmp_path):
    data = shutil.copytree(shards, tmp_path / "data")
    out = tmp_path / "runs"
    run = Trainer(tiny(str(data), out, "train.epochs=40", "data.num_workers=1", "eval.every_epochs=0",
                       "checkpoint.every_epochs=0"), tmp_path)
    run.wait_for("img_s=")
    for tar in glob.glob(str(data / "train" / "*.tar")):
        os.remove(tar)
    t = time.monotonic()
    code, _ = run.finish(timeout=120)
    secs = time.monotonic() - t
    said = run.text
    assert code == 2 and secs < 60, (code, secs, said[-3000:])
    assert "Traceback" not in said, said[-3000:]
    assert said.count("error:") == 1, said[-3000:]
    error = said[said.index("error:"):]  # the data error's own two lines, then what was saved
    assert "missing" in error and "saved first" in error and "run the same command again" in error, said[-3000:]
    from trainer.checkpoint import Checkpointer, load
    latest = Checkpointer(str(out / "t" / "checkpoints")).latest()
    assert latest is not None, "no checkpoint was written"
    state = load(latest)
    assert state["step"] > 0 and f"step {state['step']} was saved first" in error
    # the data back: the same command resumes from that step
    shutil.rmtree(data)
    shutil.copytree(shards, data)
    p = subprocess.run([sys.executable, "-m", "trainer", *tiny(str(data), out, f"train.max_steps={state['step'] + 2}",
                                                                "train.epochs=40", "eval.every_epochs=0")],
                       capture_output=True, text=True, timeout=150, env=run.env)
    assert p.returncode == 0 and "resumed from" in p.stdout + p.stderr, (p.stdout + p.stderr)[-3000:]
