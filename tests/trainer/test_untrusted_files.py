"""Files a user may have received from elsewhere never run code when loaded (issue 25, item 1): a .pt checkpoint, a
DCP folder's .metadata or entries, DeepSpeed's files, each carrying a pickle payload that would create a marker file.
Every path refuses it in one line naming the file (exit 2) or sets it aside; the marker never appears."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.trainer.test_trainer_loop import clean_env, run_in_process, tiny

pytestmark = pytest.mark.timeout(240)


class Payload:
    """Pickles as a call of os.system: loading it with full pickle creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cli(args, module, timeout=120):
    p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                       env=clean_env())
    return p.returncode, p.stderr + p.stdout


def one_line_naming(out, name):
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in out.splitlines() if "error:" in ln]
    assert len(errors) == 1 and name in errors[0] and "could run code" in errors[0], out[-3000:]


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    """One run stopped at step 5 in each checkpoint format."""
    out = {}
    for fmt in ("torch", "dcp"):
        root = tmp_path_factory.mktemp(fmt)
        run_in_process(tiny(shards, root, "train.max_steps=5", f"checkpoint.format={fmt}"))
        out[fmt] = root
    return out


def write_sidecar_for(folder):
    """A sidecar that matches the folder as it now is (an attacker can write one too)."""
    from trainer.dcp_checkpoint import file_digest
    side = folder.rstrip("/") + ".json"
    files = {f: file_digest(os.path.join(folder, f)) for f in os.listdir(folder)}
    meta = json.loads(open(side).read()) if os.path.exists(side) else {}  # noqa: SIM115
    with open(side, "w") as f:
        json.dump({**meta, "files": files}, f)


def evil_pt(path, marker):
    from trainer.checkpoint import REQUIRED
    torch.save({**{k: None for k in REQUIRED}, "config": {"x": Payload(marker)}, "model": {}}, path)


def test_evaluate_refuses_a_pt_file_carrying_code(shards, tmp_path):
    marker = tmp_path / "ran"
    evil_pt(tmp_path / "evil.pt", marker)
    code, out = cli([str(tmp_path / "evil.pt"), "--data", os.path.join(shards, "test")], "trainer.evaluate")
    assert not marker.exists(), "loading the checkpoint ran its payload"
    assert code == 2
    one_line_naming(out, "evil.pt")


def test_a_pt_file_dropped_into_checkpoints_is_set_aside_not_run(shards, runs, tmp_path):
    run = shutil.copytree(runs["torch"], tmp_path / "run")
    marker = tmp_path / "ran"
    evil_pt(run / "t" / "checkpoints" / "step-000000009.pt", marker)  # newer than the real step 5
    code, out = cli(tiny(shards, run, "train.max_steps=7"), "trainer")
    assert not marker.exists(), "the automatic resume ran the payload"
    assert code == 0, out[-3000:]
    assert "step-000000009.pt" in out and "could run code" in out and "resumed from" in out
    assert (run / "t" / "checkpoints" / "step-000000009.pt.damaged").exists()


def test_a_dcp_folder_whose_metadata_carries_code_is_refused(shards, runs, tmp_path):
    run = shutil.copytree(runs["dcp"], tmp_path / "run")
    folder = str(run / "t" / "checkpoints" / "step-000000005")
    marker = tmp_path / "ran"
    import pickle
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(Payload(marker), f)
    write_sidecar_for(folder)
    code, out = cli([folder, "--data", os.path.join(shards, "test")], "trainer.evaluate")
    assert not marker.exists(), "reading .metadata ran the payload"
    assert code == 2
    one_line_naming(out, ".metadata")
    code, out = cli(tiny(shards, run, "train.max_steps=7"), "trainer")  # the automatic resume: set aside
    assert not marker.exists() and code == 2 and "could run code" in out, out[-3000:]


def test_a_dcp_entry_carrying_code_is_refused(shards, runs, tmp_path):
    """A DCP folder written by torch's own dcp.save whose `trainer` entry pickles a call."""
    import torch.distributed.checkpoint as dcp

    from trainer.dcp_checkpoint import Blob
    marker = tmp_path / "ran"
    folder = str(tmp_path / "step-000000005")
    dcp.save({"trainer": Blob({"config": Payload(marker)}), "model/w": torch.zeros(3)},
             storage_writer=dcp.FileSystemWriter(folder), no_dist=True,
             planner=dcp.DefaultSavePlanner(flatten_state_dict=False))  # the trainer's layout
    code, out = cli([folder, "--data", os.path.join(shards, "test")], "trainer.evaluate")
    assert not marker.exists(), "loading the DCP entry ran the payload"
    assert code == 2
    one_line_naming(out, "trainer")


def test_deepspeed_export_refuses_a_model_states_file_carrying_code(tmp_path):
    ds = tmp_path / "deepspeed"
    (ds / "step-000000003").mkdir(parents=True)
    (ds / "latest").write_text("step-000000003")
    marker = tmp_path / "ran"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": Payload(marker)},
               ds / "step-000000003" / "mp_rank_00_model_states.pt")
    code, out = cli(["export", str(ds), str(tmp_path / "out.pt")], "trainer.deepspeed_engine")
    assert not marker.exists(), "the export ran the payload"
    assert code == 2
    one_line_naming(out, "mp_rank_00_model_states.pt")


def test_the_trainers_own_checkpoints_still_load(runs):
    from trainer.checkpoint import Checkpointer, load
    for fmt in ("torch", "dcp"):
        ck = Checkpointer(str(runs[fmt] / "t" / "checkpoints"))
        state = load(ck.latest())
        assert state["step"] == 5 and state["rng"][0]["numpy"][1].dtype.name == "uint32"


def test_a_raw_pickle_is_refused_naming_pickle_instructions_not_an_object(tmp_path):
    """A plain pickle (not a torch file) stops at its first instruction the safe loader does not take; the line
    says so instead of calling the opcode number a Python object."""
    import pickle

    from trainer.safe_load import UnsafeFileError, torch_load

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    path = tmp_path / "raw.pt"
    path.write_bytes(pickle.dumps({"w": Payload()}, protocol=4))
    with pytest.raises((UnsafeFileError, pickle.UnpicklingError)) as e:
        torch_load(str(path))
    assert "object 1" not in str(e.value) and not (tmp_path / "ran").exists()
