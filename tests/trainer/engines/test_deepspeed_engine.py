"""engine.name=deepspeed against engine.name=ddp: same losses, warm-up, lr schedule, checkpoints, export.

The distributed test starts 2 gloo ranks once and runs, from the same seed and the same batches, DDP and
DeepSpeed ZeRO 0, 1 and 2 in fp32 (the trainer's TrainModule with the real ProxyGML loss and the trainer's
small_cnn embedder; backbone frozen for the first steps, then rewrap; the MultiStepLR milestone mid-run;
gradient clipping on). Then it checkpoints ZeRO 0/1/2 through DeepSpeed's save/load, continues, and converts
the checkpoint to a plain state dict.

Tolerance for DeepSpeed vs DDP: rtol 2e-6 on the losses, atol 1e-6 on the final weights (measured here:
1.2e-7 and 3e-8, about one float32 ulp). Both average the same fp32 gradients over 2 ranks, but in other
buckets and another order (DeepSpeed divides each flat bucket by the world size before the sum, DDP
after), so gradients may differ in the last bit; Adam with eps 0.01 does not amplify that over 6 steps.
A real difference (a missing gradient average, a lost param group or lr, a backbone that moved during the
warm-up, Adam moments lost at the rewrap) is orders of magnitude larger.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import free_port, run_on_gloo_ranks
from trainer.engines.deepspeed_config import DeepSpeedConfigError, load_ds_config

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))  # the repository
STEPS, WARM, MILESTONE, PER_RANK, CLASSES = 6, 2, 4, 4, 5


# ---------------------------------------------------------------------------------------------------------
# config checks (no process group, fast)


def write_json(tmp_path, obj, name="ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("name", ["zero0_bf16", "zero1_bf16", "zero2_bf16", "zero2_fp16"])
def test_shipped_configs_load(name):
    clip = 0.0 if "fp16" in name else 1.0  # fp16 + ZeRO 2 + clipping is refused (see load_ds_config)
    ds = load_ds_config(os.path.join(ROOT, "launch", "deepspeed", f"{name}.json"), per_rank_batch=16,
                        world_size=8, grad_clip=clip)
    assert ds["train_batch_size"] == 128 and ds["gradient_clipping"] == clip
    assert ds["zero_optimization"]["stage"] == int(name[4])
    assert ds["torch_autocast"]["dtype"] == ("float16" if "fp16" in name else "bfloat16")


@pytest.mark.parametrize("bad, key", [
    ({"optimizer": {"type": "Adam"}}, "'optimizer'"),
    ({"scheduler": {"type": "WarmupLR"}}, "'scheduler'"),
    ({"bf16": {"enabled": True}}, "bf16.enabled"),
    ({"fp16": {"enabled": True}}, "fp16.enabled"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage=3"),
    ({"train_micro_batch_size_per_gpu": 3}, "train_micro_batch_size_per_gpu=3"),
    ({"gradient_clipping": 5.0}, "gradient_clipping=5.0"),
    ({"zero_optimization": {"stage": 2}, "torch_autocast": {"enabled": True, "dtype": "float16"}},
     "train.grad_clip=1.0"),
])
def test_bad_config_names_the_key(tmp_path, bad, key):
    with pytest.raises(DeepSpeedConfigError, match=key.replace("[", r"\[").replace(".", r"\.")):
        load_ds_config(write_json(tmp_path, bad), per_rank_batch=4, world_size=2, grad_clip=1.0)


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match="engine.deepspeed_config"):
        load_ds_config("", per_rank_batch=4, world_size=1)
    with pytest.raises(DeepSpeedConfigError, match="no such file"):
        load_ds_config(str(tmp_path / "nope.json"), per_rank_batch=4, world_size=1)
    broken = tmp_path / "broken.json"
    broken.write_text("{stage: 1")
    with pytest.raises(DeepSpeedConfigError, match="not valid JSON"):
        load_ds_config(str(broken), per_rank_batch=4, world_size=1)


def test_amp_fills_torch_autocast(tmp_path):
    ds = load_ds_config(write_json(tmp_path, {}), per_rank_batch=4, world_size=1, autocast_dtype=torch.bfloat16)
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "torch_autocast" not in load_ds_config(write_json(tmp_path, {}), per_rank_batch=4, world_size=1)


# ---------------------------------------------------------------------------------------------------------
# 2 ranks: DDP vs ZeRO 0/1/2, then checkpoints


def make_cfg(engine: str, ds_json: str, tmp: str, grad_clip: float = 0.5, amp: str = "off"):
    from omegaconf import OmegaConf

    from trainer.config import Config
    cfg = OmegaConf.structured(Config)
    cfg.model.backbone, cfg.model.pretrained, cfg.model.small_cnn_width, cfg.model.dim = "small_cnn", False, 8, 16
    cfg.train.batch_size, cfg.train.grad_clip, cfg.train.amp = PER_RANK * 2, grad_clip, amp
    cfg.engine.name, cfg.engine.deepspeed_config = engine, ds_json
    cfg.run.output_dir, cfg.run.name, cfg.checkpoint.keep_last = tmp, engine, 2
    return cfg


def build(cfg, env, seed=0):
    """The trainer's pieces: small_cnn embedder, real ProxyGML, 3 param groups, MultiStepLR."""
    from loss import ProxyGML
    from trainer.engines import TrainModule, build_engine
    from trainer.model import build_model
    torch.manual_seed(seed)
    embedder = build_model(cfg.model)
    crit = ProxyGML(CLASSES, cfg.model.dim, proxies_per_class=2, r=0.3, lam=0.3)
    module = TrainModule(embedder, crit)
    groups = [dict(params=embedder.backbone_parameters(), lr=1e-3, name="backbone"),
              dict(params=embedder.head_parameters(), lr=3e-3, name="head"),
              dict(params=list(crit.parameters()), lr=0.03, name="proxies", weight_decay=0.0)]
    opt = torch.optim.Adam(groups, eps=0.01, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [1], 0.1)  # stepped once, at step MILESTONE
    embedder.set_backbone_trainable(False)
    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.run.output_dir, cfg.run.name, "checkpoints")
    amp = torch.bfloat16 if cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and env.device.type == "cuda") else None
    engine = build_engine(cfg.engine.name, module, opt, env, grad_clip=cfg.train.grad_clip,
                          find_unused_parameters=cfg.engine.find_unused_parameters,
                          deepspeed_config=cfg.engine.deepspeed_config,
                          per_rank_batch=cfg.train.batch_size // env.world_size,
                          amp_dtype=amp, checkpoint_dir=ckpt_dir,
                          keep_last=cfg.checkpoint.keep_last)
    return module, opt, sched, engine


def batch(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(PER_RANK, 3, 16, 16, generator=g), torch.randint(0, CLASSES, (PER_RANK,), generator=g)


def train(module, sched, engine, start: int, stop: int, rank: int, amp=None) -> tuple[list, list]:
    """The loop's step (trainer/loop.py): autocast around the engine's forward when train.amp is on."""
    losses, lrs = [], []
    module.train()
    autocast = torch.autocast("cpu", dtype=amp, enabled=amp is not None)
    for step in range(start, stop):
        if step == WARM:
            module.embedder.set_backbone_trainable(True)
            engine.rewrap()
        if step == MILESTONE:
            sched.step()
        with autocast:
            loss = engine(*batch(rank, step))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
    return losses, lrs


def flat_weights(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in module.parameters()])


def flat_buffers(module) -> torch.Tensor:
    """BatchNorm statistics: both engines must run each forward with rank 0's (DDP's broadcast_buffers)."""
    return torch.cat([b.reshape(-1).float() for n, b in module.named_buffers() if "selection_counts" not in n])


def worker(rank: int, world: int, tmp: str):
    os.environ.update(DS_ACCELERATOR="cpu")  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*: set by run_on_gloo_ranks
    import collectives
    from trainer import distributed as D
    env = D.setup("cpu")
    out = {}
    fp32 = {}
    for stage in (0, 1, 2):
        fp32[stage] = os.path.join(tmp, f"zero{stage}.json")
        if rank == 0:
            with open(fp32[stage], "w") as f:
                json.dump({"zero_optimization": {"stage": stage}}, f)
    collectives.barrier()

    # 1. the same run under DDP and under ZeRO 0, 1, 2
    for name, engine_name, ds_json in [("ddp", "ddp", ""), *[(f"zero{s}", "deepspeed", fp32[s]) for s in (0, 1, 2)]]:
        cfg = make_cfg(engine_name, ds_json, tmp)
        module, opt, sched, engine = build(cfg, env)
        frozen = flat_weights(module.embedder.backbone) if hasattr(module.embedder, "backbone") else None
        losses, lrs = train(module, sched, engine, 0, WARM, rank)
        moved = None if frozen is None else (flat_weights(module.embedder.backbone) - frozen).abs().max().item()
        more, more_lrs = train(module, sched, engine, WARM, STEPS, rank)
        out[name] = dict(losses=losses + more, lrs=lrs + more_lrs, weights=flat_weights(module),
                         buffers=flat_buffers(module), backbone_moved_in_warmup=moved)

    # 2. bf16: DDP under the loop's autocast vs ZeRO 2 with launch/deepspeed/zero2_bf16.json
    for name, engine_name, ds_json in [("ddp_bf16", "ddp", ""),
                                       ("zero2_bf16", "deepspeed", os.path.join(ROOT, "launch", "deepspeed",
                                                                                "zero2_bf16.json"))]:
        cfg = make_cfg(engine_name, ds_json, tmp, amp="bf16")
        module, opt, sched, engine = build(cfg, env)
        losses, _ = train(module, sched, engine, 0, STEPS, rank, amp=torch.bfloat16)
        out[name] = dict(losses=losses, weights=flat_weights(module))

    # fp16 with loss scaling: launch/deepspeed/zero2_fp16.json (DeepSpeed's torch_autocast fp16 + GradScaler),
    # without clipping (refused with ZeRO 1/2 fp16, see load_ds_config), against DDP without clipping
    for name, engine_name, ds_json in [("ddp_noclip", "ddp", ""),
                                       ("zero2_fp16", "deepspeed", os.path.join(ROOT, "launch", "deepspeed",
                                                                                "zero2_fp16.json"))]:
        module, opt, sched, engine = build(make_cfg(engine_name, ds_json, tmp, grad_clip=0.0), env)
        losses, _ = train(module, sched, engine, 0, STEPS, rank)
        scaler = getattr(engine.optimizer, "torch_autocast_gradscaler", None)
        out[name] = dict(losses=losses, scale=scaler.get_scale() if scaler is not None else None)

    # 3. checkpoint through DeepSpeed after step 3, continue to 6; resume a fresh build from it
    for stage in (0, 1, 2):
        cfg = make_cfg("deepspeed", fp32[stage], tmp)
        cfg.run.name = f"ckpt{stage}"
        module, opt, sched, engine = build(cfg, env)
        train(module, sched, engine, 0, 3, rank)
        opt_ref = engine.optimizer_state_dict()  # collective, like the loop's save
        opt_state = engine.full_optimizer_state()
        plain = {"model": {k: v.clone() for k, v in module.embedder.state_dict().items()},
                 "criterion": {k: v.clone() for k, v in module.criterion.state_dict().items()},
                 "scheduler": sched.state_dict()}
        cont, _ = train(module, sched, engine, 3, STEPS, rank)
        final = flat_weights(module)

        module2, opt2, sched2, engine2 = build(cfg, env, seed=123)  # other init: everything must come back
        module2.embedder.load_state_dict(plain["model"])
        module2.criterion.load_state_dict(plain["criterion"])
        sched2.load_state_dict(plain["scheduler"])
        module2.embedder.set_backbone_trainable(True)  # resumed after the warm-up, as the loop does
        engine2.rewrap()
        engine2.load_optimizer_state_dict(opt_ref)
        resumed, _ = train(module2, sched2, engine2, 3, STEPS, rank)
        out[f"ckpt{stage}"] = dict(cont=cont, resumed=resumed, final=final, final_resumed=flat_weights(module2),
                                   ref=opt_ref, saved_weights=plain, opt_state=opt_state)
        if rank == 0:
            from trainer.engines.deepspeed_export import consolidated_state_dict, split_state_dict
            model_sd, crit_sd = split_state_dict(consolidated_state_dict(opt_ref["deepspeed"]["dir"],
                                                                         opt_ref["deepspeed"]["tag"]))
            out[f"ckpt{stage}"]["exported"] = dict(model=model_sd, criterion=crit_sd)
        collectives.barrier()
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    D.teardown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ds2"))
    run_on_gloo_ranks(worker, 2, tmp, timeout=840)
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(2)], tmp


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_stage_matches_ddp(two_ranks, stage):
    results, _ = two_ranks
    for r in range(2):
        ddp, ds = results[r]["ddp"], results[r][f"zero{stage}"]
        assert ds["lrs"] == ddp["lrs"]  # own proxy lr, the milestone applied to every group
        assert ds["lrs"][0] == [1e-3, 3e-3, 0.03] and ds["lrs"][-1] == pytest.approx([1e-4, 3e-4, 3e-3])
        assert ds["backbone_moved_in_warmup"] == 0.0 and ddp["backbone_moved_in_warmup"] == 0.0
        torch.testing.assert_close(torch.tensor(ds["losses"]), torch.tensor(ddp["losses"]), rtol=2e-6, atol=0)
        torch.testing.assert_close(ds["weights"], ddp["weights"], rtol=0, atol=1e-6)
        torch.testing.assert_close(ds["buffers"], ddp["buffers"], rtol=1e-5, atol=1e-6)
    # replicas agree with each other
    torch.testing.assert_close(results[0][f"zero{stage}"]["weights"], results[1][f"zero{stage}"]["weights"])


@pytest.mark.distributed
def test_bf16_zero2_close_to_ddp_bf16(two_ranks):
    """bf16 autocast on both sides; ZeRO also all-reduces Linear/Conv gradients in bf16 (torch_autocast's
    comm dtype), DDP in fp32: losses agree to bf16 precision (2^-8 = 0.4%), not to fp32's."""
    results, _ = two_ranks
    for r in range(2):
        ddp, ds = results[r]["ddp_bf16"], results[r]["zero2_bf16"]
        torch.testing.assert_close(torch.tensor(ds["losses"]), torch.tensor(ddp["losses"]), rtol=1e-2, atol=0)
        assert not torch.equal(torch.tensor(ds["losses"]), torch.tensor(results[r]["ddp"]["losses"]))  # bf16 ran


@pytest.mark.distributed
def test_fp16_zero2_scales_the_loss_and_tracks_fp32(two_ranks):
    """fp16 autocast (10-bit mantissa) with a dynamic loss scale: within 1% of the fp32 DDP run."""
    results, _ = two_ranks
    for r in range(2):
        fp16 = results[r]["zero2_fp16"]
        assert fp16["scale"] is not None and fp16["scale"] > 1.0  # a GradScaler scaled the loss
        torch.testing.assert_close(torch.tensor(fp16["losses"]), torch.tensor(results[r]["ddp_noclip"]["losses"]),
                                   rtol=1e-2, atol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_save_resume_continue(two_ranks, stage):
    results, tmp = two_ranks
    for r in range(2):
        c = results[r][f"ckpt{stage}"]
        assert len(c["cont"]) == STEPS - 3
        torch.testing.assert_close(torch.tensor(c["resumed"]), torch.tensor(c["cont"]), rtol=0, atol=0)
        torch.testing.assert_close(c["final_resumed"], c["final"], rtol=0, atol=0)
    ref = results[0][f"ckpt{stage}"]["ref"]["deepspeed"]
    assert ref["tag"] == "step-000000003" and ref["stage"] == stage
    assert os.path.isdir(os.path.join(ref["dir"], ref["tag"]))


def one_rank_resume_worker(rank: int, world: int, tmp: str, results_path: str):
    """Resume the 2-rank checkpoints of `two_ranks` on 1 rank; report the optimizer state found."""
    os.environ.update(DS_ACCELERATOR="cpu")  # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*: set by run_on_gloo_ranks
    from trainer import distributed as D
    env = D.setup("cpu")
    saved = torch.load(results_path, weights_only=False)
    out = {}
    for stage in (0, 1, 2):
        c = saved[f"ckpt{stage}"]
        cfg = make_cfg("deepspeed", os.path.join(tmp, f"zero{stage}.json"), tmp)
        module, opt, sched, engine = build(cfg, env, seed=7)
        module.embedder.load_state_dict(c["saved_weights"]["model"])
        module.criterion.load_state_dict(c["saved_weights"]["criterion"])
        module.embedder.set_backbone_trainable(True)
        engine.rewrap()
        engine.load_optimizer_state_dict(c["ref"])
        out[stage] = {"state": engine.full_optimizer_state(), "weights": flat_weights(module)}
        loss = engine(*batch(0, 3))
        engine.backward(loss)
        engine.step()
        out[stage]["loss"] = loss.item()
    torch.save(out, os.path.join(tmp, "one_rank.pt"))
    D.teardown()


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_two_rank_checkpoint_on_one_rank(two_ranks):
    """ZeRO 1/2 go through DeepSpeed's universal checkpoint; every Adam moment comes back exactly."""
    results, tmp = two_ranks
    run_on_gloo_ranks(one_rank_resume_worker, 1, tmp, os.path.join(tmp, "rank0.pt"), timeout=840)
    one = torch.load(os.path.join(tmp, "one_rank.pt"), weights_only=False)
    for stage in (0, 1, 2):
        saved = results[0][f"ckpt{stage}"]["opt_state"]
        got = one[stage]["state"]
        assert set(got) == set(saved) and saved
        for name, st in saved.items():
            assert set(st) == {"exp_avg", "exp_avg_sq"}, name
            for key, v in st.items():
                torch.testing.assert_close(got[name][key], v, rtol=0, atol=0)
        assert one[stage]["loss"] > 0
    assert os.path.isdir(os.path.join(results[0]["ckpt2"]["ref"]["deepspeed"]["dir"], "step-000000003_universal"))


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_export_plain_state_dict(two_ranks, stage):
    results, _ = two_ranks
    c = results[0][f"ckpt{stage}"]
    for part in ("model", "criterion"):
        saved, exported = c["saved_weights"][part], c["exported"][part]
        float_keys = [k for k, v in saved.items() if v.is_floating_point()]
        params = [k for k in float_keys if k in exported]
        assert params, part
        for k in params:
            torch.testing.assert_close(exported[k], saved[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# one plain process: no torchrun variables, no MPI, no compile


ONE_PROCESS = r"""
import json, sys
import torch
from tests.trainer.engines.test_deepspeed_engine import batch, build, make_cfg
from trainer import distributed as D
env = D.setup("cpu")                                       # no RANK/WORLD_SIZE/MASTER_*: a group of one
module, opt, sched, engine = build(make_cfg("deepspeed", sys.argv[1], sys.argv[2]), env)
for step in range(2):
    loss = engine(*batch(0, step)); engine.backward(loss); engine.step()
import deepspeed.comm
from deepspeed.git_version_info import installed_ops
print(json.dumps({"world": env.world_size, "loss": loss.item(), "mpi4py": "mpi4py" in sys.modules,
                  "shm_loaded": deepspeed.comm.comm.cdb.shm_comm_op is not None,
                  "shm_prebuilt": installed_ops.get("deepspeed_shm_comm", False)}))
"""


@pytest.mark.parametrize("stage", [2])
def test_one_plain_process_no_env_no_compile(tmp_path, stage):
    ds_json = write_json(tmp_path, {"zero_optimization": {"stage": stage}})
    extensions = tmp_path / "torch_extensions"  # empty: a JIT build would land here
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT", "OMPI_COMM_WORLD_SIZE")}
    env.update(TORCH_EXTENSIONS_DIR=str(extensions), PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", ONE_PROCESS, ds_json, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["world"] == 1 and out["loss"] > 0 and not out["mpi4py"]
    assert out["shm_loaded"] == out["shm_prebuilt"]  # loaded only when prebuilt at install time
    assert not (extensions / "deepspeed_shm_comm").exists()
    assert "Building extension" not in proc.stderr and "ninja" not in proc.stderr.lower()


# ---------------------------------------------------------------------------------------------------------
# the real CLI: python -m trainer engine.name=deepspeed (the trainer's loop, warm-up epoch, stop and resume)


def tiny_cli(shards, out, ds_json, *more):
    """tests/trainer/test_trainer_loop.py's seconds-long run: 2 epochs of 14 steps, warm-up epoch, milestone at 1."""
    engine = ["engine.name=deepspeed", f"engine.deepspeed_config={ds_json}"] if ds_json else []
    return [sys.executable, "-m", "trainer", "--config", "demo", "data.prepare=none", f"data.root={shards}",
            f"run.output_dir={out}", "run.name=t", "run.device=cpu", "run.deterministic=true",
            "data.num_workers=0", "model.small_cnn_width=8", "model.dim=16", "data.transform.image_size=16",
            "data.transform.resize_size=16", "train.epochs=2", "train.batch_size=64", "train.warmup_epochs=1",
            "optim.lr_milestones=[1]", "eval.every_epochs=0", "eval.at_start=false", "eval.nmi=false",
            "eval.map_r=false", "checkpoint.every_epochs=1", "tracking.enabled=false", *engine, *more]


def run_cli(cmd, launcher=()):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([*launcher, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def last_checkpoint(run_dir):
    from trainer.checkpoint import Checkpointer
    return Checkpointer(os.path.join(run_dir, "checkpoints")).load_latest()


@pytest.fixture(scope="module")
def digits(shards):
    return shards


@pytest.mark.slow
def test_cli_one_process_resume_matches_uninterrupted_and_ddp(digits, tmp_path):
    ds_json = write_json(tmp_path, {"zero_optimization": {"stage": 2}})
    run_cli(tiny_cli(digits, tmp_path / "ddp", ""))
    run_cli(tiny_cli(digits, tmp_path / "full", ds_json))
    run_cli(tiny_cli(digits, tmp_path / "cut", ds_json, "train.max_steps=19"))  # stops mid epoch 1
    cut = last_checkpoint(tmp_path / "cut" / "t")
    assert (cut["epoch"], cut["batch_in_epoch"], cut["step"]) == (1, 5, 19)
    assert cut["optimizer"]["deepspeed"]["tag"] == "step-000000019"
    run_cli(tiny_cli(digits, tmp_path / "cut", ds_json))  # resumes from step 19
    full, resumed, ddp = (last_checkpoint(tmp_path / d / "t") for d in ("full", "cut", "ddp"))
    assert resumed["step"] == full["step"] == 28
    for part in ("model", "criterion"):
        for k, v in full[part].items():
            torch.testing.assert_close(resumed[part][k], v, rtol=0, atol=0)  # exact resume
            torch.testing.assert_close(v, ddp[part][k], rtol=1e-4, atol=1e-5)  # the same training as DDP
    assert resumed["scheduler"] == full["scheduler"]

    # export: the DeepSpeed checkpoint consolidated = the .pt's weights
    out = tmp_path / "plain.pt"
    run_cli([sys.executable, "-m", "trainer.deepspeed_engine", "export",
             str(tmp_path / "cut" / "t" / "checkpoints" / "deepspeed"), str(out)])
    plain = torch.load(out, weights_only=False)
    for part in ("model", "criterion"):
        for k in plain[part]:
            torch.testing.assert_close(plain[part][k], resumed[part][k], rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_cli_two_ranks_zero2_resume_matches_uninterrupted(digits, tmp_path):
    ds_json = os.path.join(ROOT, "launch", "deepspeed", "zero2_bf16.json")  # bf16 autocast on the CPU too
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    run_cli(tiny_cli(digits, tmp_path / "full", ds_json, "train.amp=bf16")[1:], launcher=torchrun)
    run_cli(tiny_cli(digits, tmp_path / "cut", ds_json, "train.amp=bf16", "train.max_steps=19")[1:],
            launcher=torchrun)
    cut = last_checkpoint(tmp_path / "cut" / "t")
    assert (cut["step"], cut["world_size"], cut["optimizer"]["deepspeed"]["stage"]) == (19, 2, 2)
    run_cli(tiny_cli(digits, tmp_path / "cut", ds_json, "train.amp=bf16")[1:], launcher=torchrun)
    full, resumed = last_checkpoint(tmp_path / "full" / "t"), last_checkpoint(tmp_path / "cut" / "t")
    assert resumed["step"] == full["step"] == 28
    for part in ("model", "criterion"):
        for k, v in full[part].items():
            torch.testing.assert_close(resumed[part][k], v, rtol=0, atol=0)
