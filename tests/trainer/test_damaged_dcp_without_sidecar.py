"""A damaged newest DCP checkpoint without its sidecar (bytes overwritten inside a .distcp, same size) is set aside and
the previous one resumed (issue 25, item 5), by the real trainer on a real run directory."""
import os
import subprocess
import sys

import pytest

from tests.trainer.test_trainer_loop import clean_env, run_in_process, tiny

pytestmark = pytest.mark.timeout(240)


def damage_a_model_tensor(folder):
    """Overwrite the first bytes of the stored item of one model tensor (its torch.save header): same size, and
    not part of what read_meta reads."""
    from torch.distributed.checkpoint import FileSystemReader
    md = FileSystemReader(folder).read_metadata()  # the test's own file
    key, info = next((k, v) for k, v in md.storage_data.items() if k.fqn.startswith("model/"))
    path = os.path.join(folder, info.relative_path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\xff" * min(64, info.length))
    assert os.path.getsize(path) == size
    return key.fqn


@pytest.mark.parametrize("with_sidecar", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_damaged_newest_dcp_checkpoint_is_set_aside_and_the_previous_resumed(shards, tmp_path, with_sidecar):
    out = tmp_path / "runs"
    run_in_process(tiny(shards, out, "train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep_last=3"))
    ckpts = out / "t" / "checkpoints"
    newest = str(ckpts / "step-000000006")
    assert os.path.isdir(newest) and os.path.isdir(ckpts / "step-000000003")
    if not with_sidecar:
        os.remove(newest + ".json")
    damage_a_model_tensor(newest)
    for attempt in range(2):  # the second start must not meet the damaged one again
        p = subprocess.run([sys.executable, "-m", "trainer", *tiny(shards, out, "train.max_steps=8",
                                                                   "checkpoint.every_steps=3")],
                           capture_output=True, text=True, timeout=150, env=clean_env())
        said = p.stdout + p.stderr
        assert p.returncode == 0, said[-3000:]
        assert "Traceback" not in said
        if attempt == 0:
            assert "damaged" in said and "step-000000006" in said, said[-3000:]
            assert "resumed from" in said and "step-000000003" in said.split("resumed from")[1].splitlines()[0]
            assert os.path.isdir(newest + ".damaged")
