"""Conditions that are not bugs end in one line and an exit status, not a traceback (issue 25, item 4): an evaluation
failing on one rank of two, a test split with no readable sample, out of memory in training and in evaluation (the
process's address space capped with RLIMIT_AS: a real allocation failure), and pytorch-metric-learning losses that
passed the config check but crashed at step 1-2 (the check now trains two steps with the sampler's batches)."""
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

from tests.trainer.test_trainer_loop import clean_env, run_in_process, tiny

pytestmark = pytest.mark.timeout(300)


def run(args, module="trainer", timeout=200, launcher=(), preexec=None):
    t = time.monotonic()
    p = subprocess.run([sys.executable, *launcher, "-m", module, *args], capture_output=True, text=True,
                       timeout=timeout, env=clean_env(), preexec_fn=preexec)
    return p.returncode, p.stdout + p.stderr, time.monotonic() - t


def one_error(said):
    assert "Traceback" not in said, said[-4000:]
    errors = [ln for ln in said.splitlines() if "error:" in ln]
    assert len(errors) == 1, said[-4000:]
    return errors[0]


@pytest.fixture(scope="module")
def checkpoint(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck")
    run_in_process(tiny(shards, out, "train.max_steps=3", "checkpoint.format=torch"))
    return str(out / "t" / "checkpoints" / "step-000000003.pt")


def undecodable_images(split_dir, only=None):
    """Every image of the split's shards (or of shard `only`) replaced by random bytes of its size: the tars stay
    valid and of the same size, the images no longer decode."""
    for name in sorted(os.listdir(split_dir)):
        if not name.endswith(".tar") or (only is not None and name != only):
            continue
        path = os.path.join(split_dir, name)
        with tarfile.open(path) as src:
            members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
        with tarfile.open(path + ".tmp", "w", format=tarfile.GNU_FORMAT) as dst:
            for m, data in members:
                if m.name.endswith((".png", ".jpg", ".jpeg")):
                    data = os.urandom(len(data))
                dst.addfile(m, io.BytesIO(data))
        assert os.path.getsize(path + ".tmp") == os.path.getsize(path)
        os.replace(path + ".tmp", path)


def test_a_test_split_with_no_readable_sample_is_one_line(shards, checkpoint, tmp_path):
    data = shutil.copytree(shards, tmp_path / "data")
    undecodable_images(str(data / "test"))
    code, said, secs = run([checkpoint, "--data", str(data / "test"), "--num-workers", "0"], "trainer.evaluate")
    assert code == 2 and "readable sample" in one_error(said), said[-3000:]


@pytest.mark.distributed
def test_an_evaluation_failing_on_one_rank_of_two_is_one_line(shards, checkpoint, tmp_path):
    from trainer.distributed import free_port
    data = shutil.copytree(shards, tmp_path / "data")
    shards_of_test = sorted(n for n in os.listdir(data / "test") if n.endswith(".tar"))
    with open(data / "test" / shards_of_test[-1], "r+b") as f:  # one shard garbage: one rank's share
        f.write(os.urandom(os.path.getsize(data / "test" / shards_of_test[-1])))
    code, said, secs = run([checkpoint, "--data", str(data / "test"), "--num-workers", "0"], "trainer.evaluate",
                           launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                                     "127.0.0.1", "--master_port", str(free_port())))
    assert code != 0 and secs < 120, (code, secs, said[-3000:])
    own = said.split("torch.distributed.elastic")[0]  # what the ranks printed, before torchrun's own summary
    assert "RuntimeError" not in said and 'trainer/evaluation/' not in said, said[-4000:]
    errors = [ln for ln in own.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "damaged shard" in errors[0], said[-4000:]


def cap_memory(mib):
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (mib << 20, mib << 20))
    return limit


@pytest.mark.parametrize("where,key,more", [
    ("train", "train.batch_size", ["data.transform.image_size=512", "data.transform.resize_size=512",
                                   "eval.at_start=false"]),
    ("eval", "eval.batch_size", ["data.transform.image_size=384", "data.transform.resize_size=384",
                                 "eval.at_start=true", "eval.batch_size=512", "train.batch_size=8"]),
])
def test_out_of_memory_names_the_keys_to_lower(shards, tmp_path, where, key, more):
    args = tiny(shards, tmp_path / "runs", "train.max_steps=2", "model.small_cnn_width=16", *more)
    code, said, secs = run(args, preexec=cap_memory(5000))  # a tiny run peaks at about 4.1 GB of address space
    line = one_error(said)
    assert code == 2 and "out of memory" in line and key in line and "image_size" in line, said[-3000:]


@pytest.mark.parametrize("loss,more", [("DynamicSoftMarginLoss", []),
                                       ("SmoothAPLoss", ["data.sampler=m_per_class", "data.m_per_class=16"])])
def test_metric_losses_that_pass_the_check_train(shards, tmp_path, loss, more):
    code, said, _ = run(tiny(shards, tmp_path / "runs", f"loss.name={loss}", "train.max_steps=4", *more))
    assert code == 0 and "step 4" in said, said[-3000:]


def test_a_loss_that_needs_m_per_class_batches_is_refused_at_start(shards, tmp_path):
    code, said, secs = run(tiny(shards, tmp_path / "runs", "loss.name=SmoothAPLoss", "train.max_steps=4"))
    line = one_error(said)
    assert code == 2 and "data.sampler" in line and "m_per_class" in line, said[-3000:]
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()
