"""DCP checkpoints of class-sharded proxies (real gloo ranks, uneven blocks): saved as each rank's block, loaded
on another world size with exactly the same proxies and Adam moments; async saves stage a copy; damaged folders
are skipped and moved aside; keep-last and temporaries apply to folders."""
import os
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.helpers import free_port, run_on_gloo_ranks
from trainer.checkpoint import Checkpointer, load, sidecar

C, N, DIM = 7, 2, 4  # 14 proxy rows: blocks of 8+6 on 2 ranks, 4+4+4+2 on 4, 6+4+4 on 3


def _parts(seed):
    from loss.distributed import build_criterion
    from trainer.engines import TrainModule

    torch.manual_seed(seed)
    embedder = nn.Linear(3, DIM)
    crit = build_criterion("sharded", C, DIM, proxies_per_class=N, r=0.5, lam=0.3, seed=seed)
    module = TrainModule(embedder, crit)
    opt = torch.optim.Adam([dict(params=embedder.parameters(), name="backbone"),
                            dict(params=[crit.proxies], name="proxies")], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3], 0.5)
    return embedder, crit, module, opt, sched


def _full(crit, opt):
    """The full proxy table and Adam moments, gathered (the reference, outside the checkpoint path)."""
    st = opt.state[crit.proxies]
    return {k: crit.gather_rows(v).numpy() for k, v in
            (("proxies", crit.proxies), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"]))}


def _worker(rank, world, phase, path, use_async):
    from trainer.dcp_checkpoint import build_state, load_train_state
    from trainer.dcp_save import DCPSaver
    from trainer.train_state import Trained
    if phase == "save":
        embedder, crit, module, opt, sched = _parts(0)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):  # two Adam steps: moments that differ per row
            x, y = torch.randn(8, 3, generator=g), torch.randint(0, C, (8,), generator=g)
            module(x[rank::world], y[rank::world]).backward()
            for p in embedder.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
            opt.step()
            opt.zero_grad()
        sched.step()
        ref = _full(crit, opt)
        meta = dict(step=2, epoch=1, run_uid="u", world_size=world)
        sd = build_state(meta, Trained(embedder, crit, module, opt, sched, None).parts, rank)
        rows = {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "global_shape")}
        saver = DCPSaver(Checkpointer(path))
        saver.save(sd, 2, meta, async_save=use_async)
        if use_async:  # training goes on while the disk is written: the checkpoint keeps the staged values
            with torch.no_grad():
                crit.proxies.add_(1000.0)
                opt.state[crit.proxies]["exp_avg"].add_(1000.0)
            saver.wait()
        return dict(ref=ref, rows=rows, model={k: v.numpy() for k, v in embedder.state_dict().items()})
    else:
        embedder, crit, module, opt, sched = _parts(5)  # other values everywhere: the load must set them
        ckpt = Checkpointer(path).paths()[-1]
        state = load_train_state(ckpt, Trained(embedder, crit, module, opt, sched, None).parts)
        embedder.load_state_dict(state["model"])
        with torch.no_grad():
            crit.proxies.copy_(state["criterion"]["proxies"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        block = tuple(state["criterion"]["proxies"].shape)
        return dict(full=_full(crit, opt), block=block, start=crit.proxy_start,
                    model={k: v.numpy() for k, v in embedder.state_dict().items()},
                    last_epoch=sched.last_epoch,
                    step=float(opt.state[crit.proxies]["step"]))


def _run(world, phase, path, use_async=False):
    return dict(enumerate(run_on_gloo_ranks(_worker, world, phase, str(path), use_async)))


def _check_load(saved, path, world):
    loaded = _run(world, "load", path)
    ref = saved[0]["ref"]
    for r, res in loaded.items():
        for k in ref:  # exact equality: proxies and both Adam moments, whatever the blocks
            np.testing.assert_array_equal(res["full"][k], ref[k], err_msg=f"{k} on rank {r} of {world}")
        for k, v in saved[0]["model"].items():
            np.testing.assert_array_equal(res["model"][k], v)
        assert res["last_epoch"] == 1 and res["step"] == 2.0
    from collectives import block
    blocks = [loaded[r]["block"] for r in range(world)]
    assert blocks == [((block(C, world, r)[1] - block(C, world, r)[0]) * N, DIM) for r in range(world)]
    assert [loaded[r]["start"] for r in range(world)] == [block(C, world, r)[0] * N for r in range(world)]


@pytest.mark.distributed
def test_two_ranks_save_blocks_then_load_on_one(tmp_path):
    saved = _run(2, "save", tmp_path)
    # each rank contributed only its own block of rows (8 and 6 of 14), never the full table
    assert saved[0]["rows"]["criterion/proxies"] == (8, DIM) and saved[1]["rows"]["criterion/proxies"] == (6, DIM)
    assert saved[1]["rows"]["optim/criterion.proxies/exp_avg"] == (6, DIM)
    folder = Checkpointer(str(tmp_path)).paths()[-1]
    assert os.path.basename(folder) == "step-000000002" and os.path.isfile(sidecar(folder))
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(os.listdir(folder))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    # the file of rank 1 holds its rows, not the table: smaller than rank 0's (which also has the model)
    assert os.path.getsize(os.path.join(folder, "__1_0.distcp")) < os.path.getsize(os.path.join(folder,
                                                                                               "__0_0.distcp"))
    _check_load(saved, tmp_path, 1)
    # one process can assemble the .pt layout (tools, evaluate)
    state = load(folder, check_keys=False)
    np.testing.assert_array_equal(state["criterion"]["proxies"].numpy(), saved[0]["ref"]["proxies"])


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_save_then_load_on_four(tmp_path):
    _check_load(_run(2, "save", tmp_path), tmp_path, 4)


@pytest.mark.distributed
@pytest.mark.slow
def test_four_ranks_async_save_then_load_on_three(tmp_path):
    saved = _run(4, "save", tmp_path, use_async=True)
    assert [saved[r]["rows"]["criterion/proxies"][0] for r in range(4)] == [4, 4, 4, 2]
    _check_load(saved, tmp_path, 3)


# ------------------------------------------------------------------ folders: damage, keep-last, temporaries

def _one_process_saves(directory, steps, keep_last=3):
    from loss.distributed import build_criterion
    from trainer.dcp_checkpoint import build_state
    from trainer.dcp_save import DCPSaver
    from trainer.engines import TrainModule
    from trainer.train_state import Trained
    torch.manual_seed(0)
    embedder = nn.Linear(3, DIM)
    crit = build_criterion("gather", C, DIM)
    opt = torch.optim.SGD(list(embedder.parameters()) + list(crit.parameters()), lr=0.1, momentum=0.9)
    ck = Checkpointer(str(directory), keep_last=keep_last)
    saver = DCPSaver(ck)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3], 0.5)
    parts = Trained(embedder, crit, TrainModule(embedder, crit), opt, sched, None).parts
    for step in steps:
        meta = dict(config={}, model=None, step=step, epoch=0, batch_in_epoch=step, rng=[], run_uid="u",
                    world_size=1)
        sd = build_state(meta, parts, 0)
        saver.save(sd, step, meta)
    return ck


@pytest.mark.parametrize("damage", ["truncate", "garble", "no-metadata"])
def test_damaged_latest_folder_falls_back_to_the_previous_one(tmp_path, damage):
    ck = _one_process_saves(tmp_path, (1, 2))
    latest = ck.latest()
    data_file = os.path.join(latest, "__0_0.distcp")
    if damage == "truncate":
        with open(data_file, "r+b") as f:
            f.truncate(os.path.getsize(data_file) // 2)
    elif damage == "garble":
        with open(data_file, "r+b") as f:
            f.seek(os.path.getsize(data_file) // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    else:
        os.remove(os.path.join(latest, ".metadata"))
    said = []
    path, state = ck.find_latest(log=said.append)
    assert state["step"] == 1 and path.endswith("step-000000001")
    assert len(said) == 1 and "step-000000002" in said[0] and "damaged" in said[0]
    assert os.path.isdir(latest + ".damaged") and ck.latest() == path


def test_keep_last_and_mixed_formats(tmp_path):
    ck = Checkpointer(str(tmp_path), keep_last=2)
    from trainer.checkpoint import REQUIRED
    ck.save({**{k: None for k in REQUIRED}, "step": 1}, 1)  # a .pt from the torch format
    _one_process_saves(tmp_path, (2, 3), keep_last=2)
    assert sorted(os.listdir(tmp_path)) == ["step-000000002", "step-000000002.json", "step-000000003",
                                            "step-000000003.json"]
    os.makedirs(tmp_path / ".tmp-step-000000004")  # a killed write
    (tmp_path / ".tmp-step-000000004" / "__0_0.distcp").write_bytes(b"x")
    assert ck.clean_temporaries() == [str(tmp_path / ".tmp-step-000000004")]
    assert load(ck.latest())["step"] == 3


def test_one_process_save_and_load_warn_nothing(tmp_path):
    """Every single-process checkpoint, resume and evaluation saves or loads a folder: torch's "assuming the
    intent is to save/load in a single process" warning is not the user's business."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ck = _one_process_saves(tmp_path, (1,))
        state = load(ck.latest())
    assert state["step"] == 1 and state["criterion"]["proxies"].shape == (C, DIM)


# ------------------------------------------------------------------ the trainer: 2 ranks -> 3 ranks -> 1 rank

@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_run_on_two_ranks_resumes_on_three_then_one(shards, tmp_path):
    """The demo's sharded run, DCP checkpoints (the default format): steps continue across world sizes."""
    import subprocess
    import sys

    from tests.trainer.test_trainer_loop import ROOT, clean_env, tiny

    def run(ranks, epochs):
        args = tiny(shards, tmp_path, f"train.epochs={epochs}", "train.warmup_epochs=0", "loss.mode=sharded",
                    "train.batch_size=96", "tracking.enabled=false", "checkpoint.async_save=true",
                    "checkpoint.every_steps=4")
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                     "127.0.0.1", "--master_port", str(free_port())] if ranks > 1 else [sys.executable])
        r = subprocess.run(launcher + ["-m", "trainer", "--config", "demo", *args], cwd=ROOT, env=clean_env(),
                           capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout + r.stderr

    run(2, 1)
    ck = Checkpointer(str(tmp_path / "t" / "checkpoints"))
    from data_shards import read_manifest
    steps = read_manifest(os.path.join(shards, "train")).num_samples // 96  # batches per epoch
    assert os.path.isdir(ck.latest()) and load(ck.latest())["step"] == steps
    said = run(3, 2)
    assert "saved on 2 ranks, now 3" in said and f"step {steps}" in said
    assert load(ck.latest())["step"] == 2 * steps and load(ck.latest())["world_size"] == 3
    said = run(1, 3)
    assert "saved on 3 ranks, now 1" in said
    state = load(ck.latest())
    assert (state["step"], state["epoch"], state["world_size"]) == (3 * steps, 3, 1)
    assert not [f for f in os.listdir(ck.dir) if f.startswith(".tmp-")]


def test_async_saves_are_published_and_the_last_save_waits(shards, tmp_path):
    """checkpoint.async_save: steps 3 and 6 written in the background (published at the next save), the stop at
    train.max_steps=8 (the SIGTERM path) waits: three complete folders, no temporary left, exact resume data."""
    from tests.trainer.test_trainer_loop import run_in_process, tiny
    run_in_process(tiny(shards, tmp_path, "checkpoint.async_save=true", "checkpoint.every_steps=3",
                        "train.max_steps=8", "tracking.enabled=false"))
    ck = Checkpointer(str(tmp_path / "t" / "checkpoints"))
    assert [os.path.basename(p) for p in ck.paths()] == ["step-000000003", "step-000000006", "step-000000008"]
    assert not [f for f in os.listdir(ck.dir) if f.startswith(".tmp-")]
    states = [load(p) for p in ck.paths()]
    assert [s["step"] for s in states] == [3, 6, 8]
    assert not torch.equal(states[0]["criterion"]["proxies"], states[1]["criterion"]["proxies"])  # staged copies
