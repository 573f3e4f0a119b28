"""engine.name=deepspeed: the same (embedder + criterion) TrainModule under `deepspeed.initialize`.

    engine = DeepSpeedEngine(cfg, module, optimizer, env)   # what trainer.engine.build_engine returns
    loss = engine(images, labels); engine.backward(loss); engine.step()
    engine.rewrap()                                       # after requires_grad changed (warm-up end)
    sd = engine.optimizer_state_dict()                    # collective: DeepSpeed's save_checkpoint
    engine.load_optimizer_state_dict(sd)                  # collective: DeepSpeed's load_checkpoint

What stays ours, so that a DeepSpeed run behaves like a DDP run:
- the torch optimizer built by the trainer (its param groups: backbone, head, proxies with their own lr).
  DeepSpeed wraps it (ZeRO 1/2 partition its state) but keeps its param-group dicts, so the trainer's
  MultiStepLR, stepped on that torch optimizer, drives the learning rates; no DeepSpeed scheduler is used.
  Passing a torch optimizer also means DeepSpeed never JIT-compiles its fused Adam.
- the process group: trainer.distributed.setup() creates it (a group of one for plain `python`), and
  DeepSpeed adopts it without MPI discovery, so no mpi4py lookup and no MASTER_* errors.
- the weights: mixed precision is DeepSpeed's `torch_autocast` (fp32 weights, bf16/fp16 compute), because
  TrainModule keeps the loss and the proxies in fp32; the module's parameters are then always the full fp32
  weights on every rank (ZeRO 1/2 partition optimizer state and gradients only), so the trainer's plain
  checkpoint dict holds the exact model for evaluation and export.

DeepSpeed's checkpoint (optimizer partitions, loss scaler, step counters) sits in
`<checkpoint dir>/deepspeed/step-NNNNNNNNN/`; the trainer's `.pt` names it in its `optimizer` entry (the
last `checkpoint.keep_last` folders are kept, like the `.pt` files). Resuming on another number of ranks
converts a ZeRO 1/2 checkpoint once to DeepSpeed's universal format and re-partitions it.
`python -m trainer.deepspeed_engine export DS_DIR OUT.pt` turns a DeepSpeed checkpoint into a plain
state dict with DeepSpeed's zero_to_fp32 helpers.

Not supported, with a clear error: loss.mode=sharded (per-rank proxy blocks; DeepSpeed would average them),
ZeRO stage 3, DeepSpeed's `bf16`/`fp16` sections (whole-module casts; use `torch_autocast`), an `optimizer`
or `scheduler` section in the JSON.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings

import torch
import torch.distributed as dist

TAG_FORMAT = "step-{:09d}"
TAG = re.compile(r"step-\d{9}")
PRECISION_KEYS = ("bf16", "fp16")  # DeepSpeed's own casts of the whole module: not for TrainModule
OURS = ("optimizer", "scheduler")  # sections the trainer owns


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed JSON that cannot run here; the message names the file and key."""


# ---------------------------------------------------------------------------------------------------------
# the environment: a process group DeepSpeed adopts, and no compile on the CPU


def skip_cpu_shm_comm_build() -> bool:
    """On the CPU accelerator, stop DeepSpeed from JIT-compiling `deepspeed_shm_comm` (~30 s of g++).

    DeepSpeed's TorchBackend loads that op whenever it starts, even on a process group that already exists,
    but only its inference all-reduce uses it; training collectives go through torch.distributed (gloo).
    When the op was prebuilt at install time (DS_BUILD_SHM_COMM=1) it loads instantly and is kept.
    Returns True when the build was skipped.
    """
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        return False
    from deepspeed.git_version_info import installed_ops
    if installed_ops.get("deepspeed_shm_comm", False):
        return False
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the dict DeepSpeed consults before a build
    return True


def adopt_process_group() -> None:
    """Hand the existing torch.distributed group to DeepSpeed (no MPI discovery, no second init)."""
    if not dist.is_initialized():
        raise RuntimeError("engine=deepspeed: the process group must exist first (trainer.distributed.setup())")
    import deepspeed
    import deepspeed.comm
    from deepspeed.utils import logger
    if deepspeed.comm.is_initialized():
        return
    # ZeRO calls all_gather_into_tensor, which torch 2.14 flags as deprecated once per rank: not the user's to fix
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if logger.level < logging.WARNING:
        logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines would bury the progress bar and loss lines
    skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False,
                               dist_init_required=False)


# ---------------------------------------------------------------------------------------------------------
# the DeepSpeed JSON: precision and ZeRO from the file, batch / clipping / optimizer from our config


def load_ds_config(path: str, *, per_rank_batch: int, world_size: int, grad_clip: float = 0.0,
                   autocast_dtype: torch.dtype | None = None) -> dict:
    """The JSON at `path`, completed with the trainer's batch size and clipping; bad keys raise, named."""
    if not path:
        raise DeepSpeedConfigError("engine.deepspeed_config: required with engine.name=deepspeed "
                                   "(e.g. launch/deepspeed/zero1_bf16.json)")
    if not os.path.isfile(path):
        raise DeepSpeedConfigError(f"engine.deepspeed_config: no such file {path!r}")
    with open(path) as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as e:
            raise DeepSpeedConfigError(f"engine.deepspeed_config: {path} is not valid JSON: {e}") from e
    for key in OURS:
        if key in ds:
            raise DeepSpeedConfigError(
                f"{path}: remove {key!r}: the trainer builds the torch optimizer from optim.* (its own param "
                "groups and lrs) and drives the lr schedule from optim.lr_milestones")
    for key in PRECISION_KEYS:
        if ds.get(key, {}).get("enabled", False):
            raise DeepSpeedConfigError(
                f"{path}: {key}.enabled casts the whole module, proxies included, to {key}, but the ProxyGML "
                f'loss runs in fp32; use "torch_autocast": {{"enabled": true, "dtype": '
                f'"{"bfloat16" if key == "bf16" else "float16"}"}} (fp32 weights, {key} compute)')
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise DeepSpeedConfigError(f"{path}: zero_optimization.stage={stage}: engine=deepspeed supports 0, 1, 2 "
                                   "(stage 3 partitions the weights that the loop and evaluation read whole)")
    fp16 = ds.get("torch_autocast", {}).get("enabled", False) and ds["torch_autocast"].get("dtype") in (
        "float16", "fp16", "half")
    if fp16 and stage in (1, 2) and grad_clip > 0:
        raise DeepSpeedConfigError(
            f"{path}: torch_autocast float16 with zero_optimization.stage={stage} and train.grad_clip={grad_clip}: "
            "DeepSpeed 0.19.8 clips the loss-scaled gradients there (measured: updates ~65536x too small); "
            "set train.grad_clip=0, or use bf16 (no loss scale) or stage 0")
    ours = {"train_micro_batch_size_per_gpu": per_rank_batch, "gradient_accumulation_steps": 1,
            "train_batch_size": per_rank_batch * world_size, "gradient_clipping": float(grad_clip)}
    for key, value in ours.items():
        if key in ds and ds[key] != value:
            raise DeepSpeedConfigError(f"{path}: {key}={ds[key]!r} disagrees with the trainer's {value!r} "
                                       "(train.batch_size / train.grad_clip): leave it out of the JSON")
    ds.update(ours)
    if "torch_autocast" not in ds and autocast_dtype is not None:  # follow train.amp, as DDP does
        ds["torch_autocast"] = {"enabled": True, "dtype": str(autocast_dtype).removeprefix("torch.")}
    ds.setdefault("zero_allow_untested_optimizer", True)  # torch SGD under ZeRO: a plain per-partition step
    ds.setdefault("steps_per_print", 2**31 - 1)
    return ds


# ---------------------------------------------------------------------------------------------------------
# ZeRO 1/2: per-parameter optimizer state in and out of the flat partitions (for rewrap)


def _zero_optimizer(ds_engine):
    """DeepSpeed's ZeRO 1/2 optimizer wrapper, or None at stage 0 (the torch optimizer is used directly)."""
    opt = ds_engine.optimizer
    return opt if hasattr(opt, "single_partition_of_fp32_groups") else None


def _fragments(zero, i):
    """(param, slice in the flattened param, slice in this rank's flat partition) of group i."""
    for p in zero.bit16_groups[i]:
        m = getattr(p, "_hp_mapping", None)
        if m is None:  # no part of p lives in this rank's partition
            yield p, None, None
            continue
        lp, hp = m.lp_fragment_address, m.hp_fragment_address
        yield p, slice(lp.start, lp.start + lp.numel), slice(hp.start, hp.start + hp.numel)


def _export_zero_state(ds_engine) -> dict:
    """Per-parameter optimizer state gathered from the flat partitions of every rank. Collective."""
    zero = _zero_optimizer(ds_engine)
    per_param, steps = {}, {}
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        state = zero.optimizer.state.get(flat, {})
        keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
        if "step" in state:
            steps[i] = state["step"].clone()
        for p, lp, hp in _fragments(zero, i):
            per_param[p] = {}
            for key in keys:
                full = torch.zeros(p.numel(), dtype=torch.float32, device=flat.device)
                if lp is not None:
                    full[lp] = state[key][hp]
                dist.all_reduce(full, group=zero.real_dp_process_group[i])
                per_param[p][key] = full
    return {"params": per_param, "steps": steps}


def _import_zero_state(ds_engine, saved: dict) -> None:
    """Write per-parameter state into the new flat partitions (each rank fills its own slice)."""
    zero = _zero_optimizer(ds_engine)
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        if i not in saved["steps"]:
            continue  # a group that never stepped (the frozen backbone): the optimizer starts it lazily
        state = {"step": saved["steps"][i]}
        for p, lp, hp in _fragments(zero, i):
            for key, full in saved["params"].get(p, {}).items():
                buf = state.setdefault(key, torch.zeros_like(flat))
                if lp is not None:
                    buf[hp] = full[lp].to(flat)
        zero.optimizer.state[flat] = state


# ---------------------------------------------------------------------------------------------------------
# the engine


class DeepSpeedEngine:
    """The trainer's engine seam (see trainer/engine.py) over a DeepSpeed engine."""

    def __init__(self, cfg, module, optimizer: torch.optim.Optimizer, env):
        from trainer.engine import ddp_ignored_names
        ignored = set(ddp_ignored_names(module))
        if ignored & {n for n, _ in module.named_parameters()}:
            raise DeepSpeedConfigError(
                "loss.mode=sharded with engine.name=deepspeed: DeepSpeed averages every parameter's gradient "
                "over the ranks, but sharded proxies are a different block per rank; use engine.name=ddp")
        self.module, self.env, self.torch_optimizer = module, env, optimizer
        # buffers DDP would broadcast from rank 0 before each forward (BatchNorm statistics), not per-rank ones
        self.buffers = [b for n, b in module.named_buffers() if n not in ignored]
        self.groups = [list(g["params"]) for g in optimizer.param_groups]  # ZeRO swaps these for partitions
        ws = env.world_size
        per_rank = cfg.train.batch_size // ws
        amp = None
        if cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and env.device.type == "cuda"):
            amp = torch.bfloat16
        self.config = load_ds_config(cfg.engine.deepspeed_config, per_rank_batch=per_rank, world_size=ws,
                                     grad_clip=cfg.train.grad_clip, autocast_dtype=amp)
        self.stage = self.config.get("zero_optimization", {}).get("stage", 0)
        self.ckpt_dir = os.path.join(cfg.checkpoint.dir or os.path.join(cfg.run.output_dir, cfg.run.name,
                                                                         "checkpoints"), "deepspeed")
        self.keep_last = cfg.checkpoint.keep_last
        adopt_process_group()
        self.ds = None
        self.rewrap()

    # --- building -----------------------------------------------------------------------------------------
    def rewrap(self):
        """(Re)build the DeepSpeed engine: ZeRO fixes the set of trainable parameters when it is built.

        The torch optimizer object stays the same (the trainer's scheduler holds it). Param groups whose
        parameters are all frozen (the backbone during warm-up) still enter ZeRO's partitions, which cannot
        hold an empty group, but step with lr 0 (see `step`), so they do not move; at the rewrap after the
        warm-up the per-parameter state of the groups that trained (Adam moments, step counts) is carried
        into the new partitions and the unfrozen groups start fresh, as under DDP.
        """
        import deepspeed
        saved, counters = None, None
        if self.ds is not None:
            counters = (self.ds.global_steps, self.ds.global_samples)  # checkpoint tags count on
            if _zero_optimizer(self.ds) is not None:
                saved = _export_zero_state(self.ds)
                for i in self.frozen_groups:  # stepped with lr 0 only: start them fresh, as DDP does
                    saved["steps"].pop(i, None)
            self.ds.destroy()  # removes ZeRO's gradient hooks from the parameters
            self.ds = None
            for g, params in zip(self.torch_optimizer.param_groups, self.groups):
                g["params"] = list(params)  # ZeRO put its flat partitions there
            if saved is not None:
                self.torch_optimizer.state.clear()
        self.frozen_groups = [i for i, g in enumerate(self.groups) if g and not any(p.requires_grad for p in g)]
        partial = [self.torch_optimizer.param_groups[i].get("name", i) for i, g in enumerate(self.groups)
                   if i not in self.frozen_groups and not all(p.requires_grad for p in g)]
        if partial:
            raise DeepSpeedConfigError(f"engine.name=deepspeed: param groups {partial} mix frozen and trainable "
                                       "parameters; freeze whole groups, or keep frozen ones out of the optimizer")
        frozen = [p for i in self.frozen_groups for p in self.groups[i]]
        for p in frozen:
            p.requires_grad_(True)
        try:
            self.ds, _, _, _ = deepspeed.initialize(model=self.module, optimizer=self.torch_optimizer,
                                                    config=self.config, dist_init_required=False)
        finally:
            for p in frozen:
                p.requires_grad_(False)
        if saved is not None:
            _import_zero_state(self.ds, saved)
        if counters is not None:
            self.ds.global_steps, self.ds.global_samples = counters

    # --- the step -------------------------------------------------------------------------------------------
    @property
    def optimizer(self):
        """DeepSpeed's optimizer: `.param_groups` are the torch optimizer's group dicts (name, lr, ...)."""
        return self.ds.optimizer

    def __call__(self, images, labels):
        self._broadcast_buffers()
        return self.ds(images, labels)

    def _broadcast_buffers(self):
        """As DDP's broadcast_buffers: every rank runs the forward with rank 0's buffers (DeepSpeed does not)."""
        if self.env.world_size == 1:
            return
        for dtype in sorted({b.dtype for b in self.buffers}, key=str):
            bufs = [b for b in self.buffers if b.dtype == dtype]
            flat = torch.cat([b.reshape(-1) for b in bufs])
            dist.broadcast(flat, src=0)
            for b, new in zip(bufs, flat.split([b.numel() for b in bufs])):
                b.copy_(new.view_as(b))

    def backward(self, loss):
        self.ds.backward(loss)

    def step(self):
        """Clipping (train.grad_clip), loss scaling, optimizer step, zero grads; frozen groups at lr 0."""
        groups = self.torch_optimizer.param_groups
        lrs = {i: groups[i]["lr"] for i in self.frozen_groups}
        for i in lrs:
            groups[i]["lr"] = 0.0  # their gradients are zeros: lr 0 keeps weight decay from moving them
        try:
            self.ds.step()
        finally:
            for i, lr in lrs.items():
                groups[i]["lr"] = lr

    # --- checkpoints ----------------------------------------------------------------------------------------
    def optimizer_state_dict(self) -> dict:
        """Collective: DeepSpeed's save_checkpoint of this step; returns the reference the trainer stores."""
        tag = TAG_FORMAT.format(self.ds.global_steps)
        self.ds.save_checkpoint(self.ckpt_dir, tag=tag)
        if self.env.rank == 0:
            self._prune()
        dist.barrier()
        return {"deepspeed": {"dir": os.path.abspath(self.ckpt_dir), "tag": tag, "stage": self.stage,
                              "world_size": self.env.world_size}}

    def load_optimizer_state_dict(self, sd: dict) -> None:
        """Collective: DeepSpeed's load_checkpoint of the tag the trainer's checkpoint names.

        On another world size, ZeRO 1/2 partitions do not fit: the checkpoint is converted once to DeepSpeed's
        universal format (deepspeed.checkpoint.ds_to_universal, on rank 0, next to the original) and loaded
        from there, re-partitioned over the new ranks.
        """
        ref = sd.get("deepspeed") if isinstance(sd, dict) else None
        if ref is None:
            raise DeepSpeedConfigError("engine.name=deepspeed: this checkpoint was written by another engine "
                                       "(its optimizer entry is a torch state dict); resume it with that engine")
        # this run's own DeepSpeed folder: the absolute path in `ref` may be another (copied or moved) run's
        ds_dir = self.ckpt_dir if os.path.isdir(os.path.join(self.ckpt_dir, ref["tag"])) else ref["dir"]
        universal = ref["world_size"] != self.env.world_size and self.stage > 0
        tag = self._to_universal(ds_dir, ref["tag"]) if universal else ref["tag"]
        before = self.ds._config.load_universal_checkpoint  # read by load_checkpoint only
        self.ds._config.load_universal_checkpoint = universal
        try:
            path, _ = self.ds.load_checkpoint(ds_dir, tag=tag, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            self.ds._config.load_universal_checkpoint = before
        if path is None:
            raise FileNotFoundError(f"resume: DeepSpeed checkpoint {ref['dir']}/{tag} is missing")

    def _to_universal(self, ds_dir: str, tag: str) -> str:
        """Rank 0 converts <tag> to <tag>_universal (once); every rank gets its name or the error."""
        out = f"{tag}_universal"
        status = [None]
        if self.env.rank == 0 and not os.path.isdir(os.path.join(ds_dir, out)):
            partial = os.path.join(ds_dir, out + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                                   os.path.join(ds_dir, tag), "--output_folder", partial, "--inject_missing_state",
                                   "--num_extract_workers", "1", "--num_merge_workers", "1"],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(partial, os.path.join(ds_dir, out))
            else:
                status = [f"resume on {self.env.world_size} ranks: converting {ds_dir}/{tag} to DeepSpeed's "
                          f"universal checkpoint failed:\n{proc.stderr[-2000:]}"]
        dist.broadcast_object_list(status, src=0)
        if status[0]:
            raise RuntimeError(status[0])
        return out

    def full_optimizer_state(self) -> dict:
        """{parameter name: {state key: full fp32 tensor}} of the groups that stepped. Collective at ZeRO 1/2."""
        names = {p: n for n, p in self.module.named_parameters()}
        if _zero_optimizer(self.ds) is not None:
            per_param = _export_zero_state(self.ds)["params"]
            return {names[p]: st for p, st in per_param.items() if st}
        return {names[p]: {k: v.clone() for k, v in st.items() if torch.is_tensor(v) and v.shape == p.shape}
                for p, st in self.torch_optimizer.state.items() if p in names}

    def _prune(self) -> None:
        """Keep the DeepSpeed folders (and their universal conversions) of the last `keep_last` saves."""
        entries = os.listdir(self.ckpt_dir)
        tags = sorted(t for t in entries if TAG.fullmatch(t))
        keep = set(tags[-self.keep_last:]) if self.keep_last > 0 else set(tags)
        for entry in entries:
            base = TAG.match(entry)
            if base and base.group(0) not in keep:
                shutil.rmtree(os.path.join(self.ckpt_dir, entry), ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# export: a DeepSpeed checkpoint -> a plain state dict


def consolidated_state_dict(ds_dir: str, tag: str | None = None) -> dict:
    """The TrainModule's full fp32 state dict from a DeepSpeed checkpoint (any of ZeRO 0, 1, 2)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    if tag is None:
        with open(os.path.join(ds_dir, "latest")) as f:
            tag = f.read().strip()
    folder = os.path.join(ds_dir, tag)
    if any(f.endswith("optim_states.pt") and "zero_pp_rank" in f for f in os.listdir(folder)):
        sd = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=tag)
    else:  # stage 0: the module states file holds the whole fp32 module
        sd = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu",
                        weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def split_state_dict(sd: dict) -> tuple[dict, dict]:
    """TrainModule keys -> (embedder state dict, criterion state dict), the trainer checkpoint's entries."""
    model = {k.removeprefix("embedder."): v for k, v in sd.items() if k.startswith("embedder.")}
    crit = {k.removeprefix("criterion."): v for k, v in sd.items() if k.startswith("criterion.")}
    return model, crit


def export(ds_dir: str, out: str, tag: str | None = None, trainer_checkpoint: str | None = None) -> str:
    """Write a plain checkpoint dict (model, criterion; config etc. from `trainer_checkpoint` if given)."""
    model, crit = split_state_dict(consolidated_state_dict(ds_dir, tag))
    state = {}
    if trainer_checkpoint:
        from trainer.checkpoint import load
        state = load(trainer_checkpoint, check_keys=False, model_only=True)  # a .pt file or a DCP folder
        state.pop("optimizer", None)
    state.update(model=model, criterion=crit)
    torch.save(state, out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m trainer.deepspeed_engine",
                                description="DeepSpeed checkpoint -> plain state dict for evaluation/export")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("ds_dir", help="<checkpoint dir>/deepspeed (holds step-* folders and 'latest')")
    e.add_argument("out", help="output .pt: {'model': embedder state dict, 'criterion': ...}")
    e.add_argument("--tag", default=None, help="step-NNNNNNNNN (default: the one named in 'latest')")
    e.add_argument("--trainer-checkpoint", default=None,
                   help="the trainer's step-N.pt or step-N/ folder: its config, epoch, step ... are copied over")
    a = p.parse_args(argv)
    print(export(a.ds_dir, a.out, a.tag, a.trainer_checkpoint))


if __name__ == "__main__":
    main()
