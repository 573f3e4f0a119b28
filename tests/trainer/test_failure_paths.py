"""Failure paths (issue 14), with real processes, shards, checkpoints and signals, each bounded by a timeout:
whatever raises, every process exits non-zero within seconds; no checkpoint or run is lost or mixed; bad values
stop before any work; expected user errors are one line and status 2."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from tests.trainer.test_trainer_loop import clean_env, run_in_process, tiny
from trainer.checkpoint import Checkpointer, load
from trainer.config import ConfigError, load_config
from trainer.errors import UserError
from trainer.run_dir import RunDir

pytestmark = pytest.mark.timeout(240)


def cli(args, timeout=120, env=None, module="trainer"):
    """Run `python -m <module> args`; (status, stderr + stdout, seconds). A hang fails the test (TimeoutExpired)."""
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                       env=env or clean_env())
    return p.returncode, p.stderr + p.stdout, time.monotonic() - t


def no_tracking(*more):
    return ["tracking.enabled=false", *more]


def garbage_copy(shards, dst, split="train"):
    """A copy of the digits shards whose `split` shards are random bytes (same sizes)."""
    import shutil
    shutil.copytree(shards, dst)
    for name in os.listdir(os.path.join(dst, split)):
        if name.endswith(".tar"):
            path = os.path.join(dst, split, name)
            with open(path, "wb") as f:
                f.write(os.urandom(os.path.getsize(os.path.join(shards, split, name))))
    return str(dst)


def data_file(checkpoint):
    """The file holding a checkpoint's tensors: the .pt itself, or rank 0's shard file of a DCP folder."""
    return os.path.join(checkpoint, "__0_0.distcp") if os.path.isdir(checkpoint) else checkpoint


def one_error_line(stderr):
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "Traceback" not in ln]
    errors = [ln for ln in lines if "error:" in ln]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


# ------------------------------------------------------------------ 1. an exception ends every process at once

def test_exception_with_loader_workers_exits_nonzero_fast(shards, tmp_path):
    """Every train shard garbage, one loader worker: before, the error printed and the process never exited."""
    bad = garbage_copy(shards, tmp_path / "bad")
    code, err, secs = cli(tiny(bad, tmp_path / "runs", "data.num_workers=1", "data.verify='off'", *no_tracking()),
                          timeout=90)  # verify=off: the workers meet the damage, not the start-up check
    assert code != 0 and secs < 60, (code, secs, err[-2000:])
    assert "no readable sample" in err


@pytest.mark.distributed
def test_one_rank_raising_ends_the_whole_torchrun_group(shards, tmp_path):
    """Rank 1 alone raises mid-epoch (a bug injected through sitecustomize): rank 1 exits 1 at once, rank 0
    leaves its collective with one line instead of waiting 30 minutes, torchrun reports the failure."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(textwrap.dedent("""
        import os
        if os.environ.get("RANK") == "1":
            import trainer.loop as L
            def boom(self, *a, **k):
                raise RuntimeError("injected bug on rank 1")
            L.Trainer.log_step = boom
    """))
    env = clean_env()
    env["PYTHONPATH"] = f"{inject}{os.pathsep}{env['PYTHONPATH']}"
    t = time.monotonic()
    from trainer.distributed import free_port
    args = tiny(shards, tmp_path / "runs", "data.num_workers=1", *no_tracking())
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", str(free_port()), "-m", "trainer", *args],
                       capture_output=True, text=True, timeout=150, env=env)
    secs = time.monotonic() - t
    assert p.returncode != 0 and secs < 90, (p.returncode, secs, p.stderr[-3000:])
    assert "injected bug on rank 1" in p.stderr


# ------------------------------------------------------------------ 2. a damaged latest checkpoint

@pytest.mark.parametrize("damage", ["truncate", "empty", "garble"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    ck = Checkpointer(str(tmp_path), keep_last=3)
    from trainer.checkpoint import REQUIRED
    for step in (1, 2):
        ck.save({**{k: None for k in REQUIRED}, "step": step, "w": torch.randn(2000)}, step)
    latest = ck.latest()
    with open(latest, "rb") as f:
        data = bytearray(f.read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    else:
        data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: torch.load itself does not notice
    with open(latest, "wb") as f:
        f.write(data)
    said = []
    path, state = ck.find_latest(log=said.append)
    assert state["step"] == 1 and path.endswith("step-000000001.pt")
    assert len(said) == 1 and "step-000000002.pt" in said[0] and "damaged" in said[0]
    assert os.path.exists(latest + ".damaged") and ck.latest() == path  # moved aside, cannot outrank


def test_trainer_resumes_from_the_intact_checkpoint_when_the_latest_is_garbled(shards, tmp_path):
    run_in_process(tiny(shards, tmp_path, "train.epochs=2", *no_tracking()))
    ck = Checkpointer(str(tmp_path / "t" / "checkpoints"))
    good, latest = ck.paths()[-2:]
    with open(data_file(latest), "r+b") as f:
        f.write(b"garbage!")
    code, err, _ = cli(tiny(shards, tmp_path, "train.epochs=3", *no_tracking()))
    assert code == 0, err[-2000:]
    assert latest in err and "damaged" in err
    assert load(ck.latest())["step"] == 3 * 14 and os.path.exists(latest + ".damaged")


# ------------------------------------------------------------------ 3. a run directory belongs to one run

def test_starting_over_archives_the_old_run_and_a_requeue_resumes_the_new_one(shards, tmp_path):
    run_in_process(tiny(shards, tmp_path, "train.epochs=2", *no_tracking()))  # an old run, 28 steps
    old = sorted(os.listdir(tmp_path / "t" / "checkpoints"))
    # a new run, preempted at step 11 (max_steps stands in for SIGTERM: the same save-and-leave path)
    run_in_process(tiny(shards, tmp_path, "checkpoint.resume=false", "checkpoint.every_steps=5",
                        "train.max_steps=11", *no_tracking()))
    archived = os.listdir(tmp_path / "t" / "previous")
    assert len(archived) == 1
    assert sorted(os.listdir(tmp_path / "t" / "previous" / archived[0] / "checkpoints")) == old  # nothing lost
    steps = [load(p)["step"] for p in Checkpointer(str(tmp_path / "t" / "checkpoints")).paths()]
    assert steps == [5, 10, 11]  # only the new run's: the old step-28 neither outranks nor deletes them
    code, err, _ = cli(tiny(shards, tmp_path, "train.epochs=2", *no_tracking()))  # the requeued job
    assert code == 0 and "step 11" in err, err[-2000:]
    assert load(Checkpointer(str(tmp_path / "t" / "checkpoints")).latest())["step"] == 28


def test_a_second_trainer_on_a_run_directory_in_use_is_refused(shards, tmp_path):
    holder = RunDir(str(tmp_path / "t"), str(tmp_path / "t" / "checkpoints")).claim()
    try:
        code, err, secs = cli(tiny(shards, tmp_path, *no_tracking()), timeout=60)
        assert code == 2 and "in use by another trainer" in one_error_line(err) and f"pid {os.getpid()}" in err
        assert not os.path.exists(tmp_path / "t" / "config.yaml")  # nothing written
    finally:
        holder.release()


def test_the_lock_of_a_killed_trainer_is_not_stale(shards, tmp_path):
    code = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from trainer.run_dir import RunDir
        RunDir({str(tmp_path / 't')!r}, {str(tmp_path / 't' / 'checkpoints')!r}).claim()
        print("locked", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=clean_env())
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(UserError, match="in use"):
        RunDir(str(tmp_path / "t"), str(tmp_path / "t" / "checkpoints")).claim()
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    RunDir(str(tmp_path / "t"), str(tmp_path / "t" / "checkpoints")).claim().release()


def test_temporaries_of_killed_writes_are_removed_at_start(shards, tmp_path):
    ckdir = tmp_path / "t" / "checkpoints"
    ckdir.mkdir(parents=True)
    (ckdir / ".tmp-abc123.pt").write_bytes(b"x" * 1000)
    (ckdir / ".tmp-def456.json").write_bytes(b"{")
    run_in_process(tiny(shards, tmp_path, "train.max_steps=2", *no_tracking()))
    assert not [f for f in os.listdir(ckdir) if f.startswith(".tmp-")]


# ------------------------------------------------------------------ 4. resuming with a changed config

@pytest.fixture(scope="module")
def mid_epoch_run(shards, tmp_path_factory):
    """A run stopped at step 5 (inside epoch 0), copied afresh for each test."""
    out = tmp_path_factory.mktemp("mid")
    run_in_process(tiny(shards, out, "train.max_steps=5", *no_tracking()))
    return out


def copy_run(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("override,key", [("model.dim=32", "model.dim"), ("train.batch_size=32", "train.batch_size"),
                                          ("loss.proxies_per_class=2", "loss.proxies_per_class"),
                                          ("optim.name=sgd", "optim.name"), ("loss.name=ProxyAnchorLoss", "loss.name")])
def test_a_change_that_cannot_carry_over_is_refused_before_anything_is_touched(shards, mid_epoch_run, tmp_path,
                                                                                  override, key):
    run = copy_run(mid_epoch_run, tmp_path / "r")
    before = (run / "t" / "config.yaml").read_text()
    code, err, _ = cli(tiny(shards, run, override, *no_tracking()), timeout=60)
    line = one_error_line(err)
    assert code == 2 and line.startswith(f"error: {key}:") and "run.name" in line, err[-2000:]
    assert (run / "t" / "config.yaml").read_text() == before
    assert [load(p)["step"] for p in Checkpointer(str(run / "t" / "checkpoints")).paths()] == [5]


def test_changes_that_can_carry_over_do_and_are_logged(shards, mid_epoch_run, tmp_path):
    run = copy_run(mid_epoch_run, tmp_path / "r")
    run_in_process(tiny(shards, run, "optim.lr=0.005", "optim.proxy_lr=0.5", "train.max_steps=7",
                        *no_tracking()))
    state = load(Checkpointer(str(run / "t" / "checkpoints")).latest())
    lrs = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    assert state["step"] == 7 and lrs["backbone"] == pytest.approx(0.005) and lrs["proxies"] == pytest.approx(0.5)
    assert state["config"]["optim"]["lr"] == 0.005


def test_batch_size_may_change_at_an_epoch_boundary(shards, tmp_path):
    run_in_process(tiny(shards, tmp_path, "train.epochs=2", "train.max_steps=14", *no_tracking()))  # epoch 1 ends
    state = load(Checkpointer(str(tmp_path / "t" / "checkpoints")).latest())
    assert (state["epoch"], state["batch_in_epoch"]) == (0, 14)  # the end of epoch 0: a boundary
    run_in_process(tiny(shards, tmp_path, "train.epochs=2", "train.batch_size=32", *no_tracking()))
    assert load(Checkpointer(str(tmp_path / "t" / "checkpoints")).latest())["step"] == 14 + 28


def test_check_resume_refuses_another_engine_and_sharded_layouts():
    from trainer.resume import check_resume
    cfg = load_config("demo", ["data.root=/x"])
    saved = load_config("demo", ["data.root=/x", "engine.name=deepspeed", "engine.deepspeed_config=a.json"])
    from omegaconf import OmegaConf
    with pytest.raises(ConfigError, match="^engine.name: .*deepspeed"):
        check_resume(OmegaConf.to_container(saved), cfg, "ck.pt", at_epoch_start=True)
    saved = load_config("demo", ["data.root=/x", "loss.mode=sharded"])
    with pytest.raises(ConfigError, match="^loss.mode: "):
        check_resume(OmegaConf.to_container(saved), cfg, "ck.pt", at_epoch_start=True)
    saved = load_config("demo", ["data.root=/y", "loss.mode=local", "train.epochs=9"])
    changes = check_resume(OmegaConf.to_container(saved), cfg, "ck.pt", at_epoch_start=False,
                           saved_data={"classes": 5, "samples": 900}, data_now={"classes": 5, "samples": 900})
    assert {c.split(":")[0] for c in changes} == {"data.root", "loss.mode", "train.epochs"}
    with pytest.raises(ConfigError, match="^data.root: .*5 classes"):
        check_resume(OmegaConf.to_container(saved), cfg, "ck.pt", at_epoch_start=True,
                     saved_data={"classes": 5, "samples": 900}, data_now={"classes": 7, "samples": 900})


# ------------------------------------------------------------------ 5. non-finite values

@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.weight_decay=inf", "optim.proxy_lr=nan",
                                      "train.grad_clip=nan", "optim.lr=nan", "loss.lam=-inf", "loss.r=nan"])
def test_non_finite_config_values_are_refused(override):
    with pytest.raises(ConfigError, match=f"^{override.split('=')[0]}: "):
        load_config("demo", ["data.root=/x", override])


def test_a_diverging_run_stops_naming_the_step_and_saves_nothing_non_finite(shards, tmp_path):
    code, err, secs = cli(tiny(shards, tmp_path, "optim.lr=1e9", "optim.head_lr=1e9", "optim.proxy_lr=1e9",
                               "train.warmup_epochs=0", "checkpoint.every_steps=1", *no_tracking()), timeout=90)
    line = one_error_line(err)
    assert code == 2 and "not finite" in line and "step " in line, err[-2000:]
    for path in Checkpointer(str(tmp_path / "t" / "checkpoints")).paths():
        state = load(path)
        for sd in (state["model"], state["criterion"]):
            assert all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point()), path


# ------------------------------------------------------------------ 6. checks that come at start-up

def test_a_batch_larger_than_the_train_split_fails_before_any_work(shards, tmp_path):
    code, err, secs = cli(tiny(shards, tmp_path, "train.batch_size=4096", *no_tracking()), timeout=60)
    assert code == 2 and one_error_line(err).startswith("error: train.batch_size:"), err[-2000:]
    assert not os.path.exists(tmp_path / "t" / "checkpoints")


def test_too_few_classes_for_m_per_class_batches_fail_before_any_work(shards, tmp_path):
    """Found by an attacker: the class shortage of the m_per_class sampler used to surface at the first batch."""
    code, err, secs = cli(tiny(shards, tmp_path, "data.sampler=m_per_class", "data.m_per_class=2",
                               "train.batch_size=32", *no_tracking()), timeout=60)
    line = one_error_line(err)
    assert code == 2 and line.startswith("error: data.m_per_class: a per-rank batch of 32"), err[-2000:]
    assert "needs 16 classes" in line and "raise data.m_per_class to at least" in line
    assert not os.path.exists(tmp_path / "t" / "checkpoints")


def test_an_empty_test_split_fails_before_any_work(shards, tmp_path):
    import json
    import shutil
    root = tmp_path / "data"
    shutil.copytree(shards, root)
    man = json.loads((root / "test" / "manifest.json").read_text())
    for s in man["shards"]:
        os.remove(root / "test" / s["name"])
        s["num_samples"] = 0
    man["shards"], man["num_samples"] = man["shards"][:1], 0
    (root / "test" / "manifest.json").write_text(json.dumps(man))
    code, err, _ = cli(tiny(str(root), tmp_path, *no_tracking()), timeout=60)
    assert code == 2 and one_error_line(err).startswith("error: data.test_split:"), err[-2000:]


def test_max_steps_is_a_limit_even_after_a_restart(shards, tmp_path):
    run_in_process(tiny(shards, tmp_path, "train.max_steps=3", *no_tracking()))
    run_in_process(tiny(shards, tmp_path, "train.max_steps=3", *no_tracking()))  # the restart trains nothing
    assert [load(p)["step"] for p in Checkpointer(str(tmp_path / "t" / "checkpoints")).paths()] == [3]


# ------------------------------------------------------------------ 9. clear errors without tracebacks

def test_unwritable_run_directory_is_one_line(shards, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    code, err, _ = cli(tiny(shards, tmp_path / "file" / "runs", *no_tracking()), timeout=60)
    assert code == 2 and one_error_line(err).startswith("error: run.output_dir:"), err[-2000:]


def test_full_disk_during_a_checkpoint_says_so_and_exits(shards, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        code, err, secs = cli(tiny(shards, tmp_path, f"checkpoint.dir={mnt}/ck", *no_tracking()), timeout=90)
        line = one_error_line(err)
        assert code == 2 and "no space left on device" in line and secs < 60, err[-2000:]
        assert not [f for f in os.listdir(mnt / "ck") if f.startswith(".tmp-")]
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_evaluate_cli_on_a_bad_checkpoint_file_is_one_line(shards, mid_epoch_run, tmp_path, content):
    path = tmp_path / "x.pt"
    if content == "truncated":
        with open(data_file(Checkpointer(str(mid_epoch_run / "t" / "checkpoints")).latest()), "rb") as f:
            good = f.read()
        content = good[: len(good) // 3]
    path.write_bytes(content)
    code, err, _ = cli([str(path), "--data", os.path.join(shards, "test"), "--num-workers", "0"],
                       module="trainer.evaluate", timeout=60)
    assert code == 2 and str(path) in one_error_line(err), err[-2000:]


@pytest.mark.distributed
def test_a_user_error_decided_on_rank_0_stops_both_ranks_with_one_line(shards, tmp_path):
    """The run directory is held by another trainer: rank 0 finds out, every rank raises the same error, rank 0
    alone prints it, torchrun exits non-zero within seconds."""
    from trainer.distributed import free_port
    holder = RunDir(str(tmp_path / "t"), str(tmp_path / "t" / "checkpoints")).claim()
    try:
        t = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                            "127.0.0.1", "--master_port", str(free_port()), "-m", "trainer",
                            *tiny(shards, tmp_path, *no_tracking())],
                           capture_output=True, text=True, timeout=120, env=clean_env())
        secs = time.monotonic() - t
    finally:
        holder.release()
    assert p.returncode != 0 and secs < 90, (p.returncode, secs, p.stderr[-3000:])
    said = [ln for ln in p.stderr.splitlines() if "in use by another trainer" in ln]
    assert len(said) == 1 and said[0].startswith("[rank 0] error: run.name:"), p.stderr[-3000:]


# ------------------------------------------------------------------ found by a fresh attacker, each now a test

def test_a_checkpoint_dir_shared_by_two_runs_is_locked_and_not_resumed_by_the_other(shards, tmp_path):
    shared = tmp_path / "shared-ck"
    a = RunDir(str(tmp_path / "a"), str(shared)).claim()
    with pytest.raises(UserError, match="^checkpoint.dir: .*in use by another trainer"):
        RunDir(str(tmp_path / "b"), str(shared)).claim()
    a.release()
    run_in_process(tiny(shards, tmp_path, "run.name=a", f"checkpoint.dir={shared}", "train.max_steps=3",
                        *no_tracking()))
    with pytest.raises(ConfigError, match="^run.name: .*another run"):
        run_in_process(tiny(shards, tmp_path, "run.name=b", f"checkpoint.dir={shared}", *no_tracking()))


def test_a_train_split_with_other_classes_is_refused(mid_epoch_run, tmp_path):
    from omegaconf import OmegaConf

    from trainer.resume import check_resume, class_digest
    cfg = load_config("demo", ["data.root=/x"])
    with pytest.raises(ConfigError, match="^data.root: .*other classes"):
        check_resume(OmegaConf.to_container(cfg), cfg, "ck.pt", at_epoch_start=True,
                     saved_data={"classes": 5, "samples": 9, "class_names": class_digest(["0", "1", "2", "3", "4"])},
                     data_now={"classes": 5, "samples": 9, "class_names": class_digest(["5", "6", "7", "8", "9"])})


def test_checkpoint_dir_that_is_the_run_dir_archives_cleanly(shards, tmp_path):
    run_dir = tmp_path / "t"
    run_in_process(tiny(shards, tmp_path, f"checkpoint.dir={run_dir}", "train.max_steps=3", *no_tracking()))
    run_in_process(tiny(shards, tmp_path, f"checkpoint.dir={run_dir}", "checkpoint.resume=false",
                        "train.max_steps=2", *no_tracking()))
    (archived,) = os.listdir(run_dir / "previous")
    assert sorted(os.listdir(run_dir / "previous" / archived)) == ["checkpoints", "config.yaml"]
    assert len(os.listdir(run_dir / "previous" / archived / "checkpoints")) == 2  # step-3 .pt and .json
    assert [load(p)["step"] for p in Checkpointer(str(run_dir)).paths()] == [2]


def test_a_checkpoint_dir_that_cannot_be_written_fails_before_training(shards, tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="^checkpoint.dir: cannot write checkpoints into"):
        run_in_process(tiny(shards, tmp_path, f"checkpoint.dir={tmp_path / 'afile'}", *no_tracking()))
    assert not os.path.exists(tmp_path / "t" / "config.yaml")


def test_when_every_checkpoint_is_damaged_the_run_is_not_silently_started_over(tmp_path):
    from trainer.checkpoint import REQUIRED, CheckpointError
    ck = Checkpointer(str(tmp_path))
    for step in (1, 2):
        ck.save({**{k: None for k in REQUIRED}, "step": step}, step)
        with open(ck.latest(), "r+b") as f:
            f.write(b"garbage")
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        ck.find_latest(log=lambda m: None)


def test_checkpoints_are_readable_by_the_group(tmp_path):
    from trainer.checkpoint import REQUIRED
    old = os.umask(0o022)
    try:
        path = Checkpointer(str(tmp_path)).save({k: None for k in REQUIRED}, 1)
    finally:
        os.umask(old)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("text,match", [("a: [1\n", "not valid YAML"), ("- 1\n- 2\n", "not a mapping")])
def test_a_config_file_that_is_not_a_config_is_one_line(tmp_path, text, match):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(str(tmp_path / "c.yaml"))


@pytest.mark.parametrize("name", ["../../etc", "a/b", ".."])
def test_run_name_cannot_leave_the_output_dir(name):
    with pytest.raises(ConfigError, match="^run.name: "):
        load_config("demo", [f"run.name={name}"])


def test_weights_that_overflow_stop_as_divergence_not_a_traceback(shards, tmp_path):
    from trainer.loop import DivergedError
    with pytest.raises(DivergedError, match="^step "):
        run_in_process(tiny(shards, tmp_path, "optim.lr=1e35", "optim.head_lr=1e35", "optim.proxy_lr=1e35",
                            "train.warmup_epochs=0", "checkpoint.every_steps=1", *no_tracking()))


def test_a_loss_kwarg_that_changes_a_shape_is_refused_before_config_yaml_is_touched(shards, tmp_path):
    base = ["loss.name=SoftTripleLoss", "loss.mode=local", "train.max_steps=2", *no_tracking()]
    run_in_process(tiny(shards, tmp_path, *base, "loss.kwargs.centers_per_class=2"))
    before = (tmp_path / "t" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match="^checkpoint.resume: .*does not fit the current config"):
        run_in_process(tiny(shards, tmp_path, *base, "loss.kwargs.centers_per_class=5", "train.max_steps=4"))
    assert (tmp_path / "t" / "config.yaml").read_text() == before


def test_evaluate_cli_refuses_nonsense_numbers_before_work(shards, mid_epoch_run):
    from trainer.evaluation.cli import main
    ckpt = Checkpointer(str(mid_epoch_run / "t" / "checkpoints")).latest()
    for bad in (["--recall-ks", "0"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit):
            main([ckpt, "--data", os.path.join(shards, "test"), *bad])


@pytest.mark.parametrize("drop", [False, True])
def test_a_process_left_with_persistent_loader_workers_still_exits(shards, tmp_path, drop):
    """Persistent train-loader workers ignore SIGTERM; a process that ends without closing its loader (a library
    user, a test) must not wait for them at interpreter exit (before: pytest itself never exited)."""
    script = textwrap.dedent(f"""
        from data_shards import eval_loader, train_loader
        loader = train_loader({os.path.join(shards, 'train')!r}, batch_size=16, num_workers=2,
                              persistent_workers=True, transform=dict(image_size=16, resize_size=16))
        next(iter(loader))
        abandoned = iter(eval_loader({os.path.join(shards, 'test')!r}, batch_size=16, num_workers=2))
        next(abandoned)  # an eval iteration left half-way: its workers are still alive at exit
        if {drop!r}:  # the loader collected: torch asks its workers to stop with SIGTERM, which they ignore
            import gc
            del loader
            gc.collect()
        print("one batch", flush=True)
    """)
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=clean_env())
    assert p.returncode == 0 and "one batch" in p.stdout and time.monotonic() - t < 45, p.stderr[-2000:]
