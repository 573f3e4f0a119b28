"""engine.name=deepspeed: the same (embedder + criterion) TrainModule under `deepspeed.initialize`.

    engine = DeepSpeedEngine(module, optimizer, env, config_path=..., per_rank_batch=..., grad_clip=...,
                             amp_dtype=..., checkpoint_dir=..., keep_last=...)   # what build_engine returns
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
  DeepSpeed adopts it without MPI discovery (trainer/engines/deepspeed_env.py).
- the weights: mixed precision is DeepSpeed's `torch_autocast` (fp32 weights, bf16/fp16 compute), because
  TrainModule keeps the loss and the proxies in fp32; the module's parameters are then always the full fp32
  weights on every rank (ZeRO 1/2 partition optimizer state and gradients only), so the trainer's plain
  checkpoint dict holds the exact model for evaluation and export.

DeepSpeed's checkpoint (optimizer partitions, loss scaler, step counters) sits in
`<checkpoint dir>/deepspeed/step-NNNNNNNNN/`; the trainer's checkpoint (a step-N/ DCP folder or a step-N.pt)
names it in its `optimizer` entry; the last `keep_last` folders are kept, like the trainer's checkpoints.
Resuming on another number of ranks converts a ZeRO 1/2 checkpoint once to DeepSpeed's universal format and
re-partitions it.
`python -m trainer.deepspeed_engine export DS_DIR OUT.pt` (trainer/engines/deepspeed_export.py) turns a
DeepSpeed checkpoint into a plain state dict.

Not supported, with a clear error: loss.mode=sharded (per-rank proxy blocks; DeepSpeed would average them),
ZeRO stage 3, DeepSpeed's `bf16`/`fp16` sections (whole-module casts; use `torch_autocast`), an `optimizer`
or `scheduler` section in the JSON (trainer/engines/deepspeed_config.py).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from typing import Any

import torch

import collectives
from loss.distributed import ddp_ignored_names
from trainer.checkpoint_disk import ENGINE_DIR
from trainer.engines.deepspeed_config import DeepSpeedConfigError, load_ds_config
from trainer.engines.deepspeed_env import adopt_process_group
from trainer.engines.zero_state import export_zero_state, import_zero_state, zero_optimizer

TAG_FORMAT = "step-{:09d}"
TAG = re.compile(r"step-\d{9}")


class DeepSpeedEngine:
    """The trainer's `Engine` (trainer/engines/__init__.py) over a DeepSpeed engine."""

    def __init__(self, module, optimizer: torch.optim.Optimizer, env, *, config_path: str, per_rank_batch: int,
                 grad_clip: float, amp_dtype: torch.dtype | None, checkpoint_dir: str, keep_last: int):
        ignored = set(ddp_ignored_names(module, module.criterion))
        if ignored & {n for n, _ in module.named_parameters()}:
            raise DeepSpeedConfigError(
                "loss.mode=sharded with engine.name=deepspeed: DeepSpeed averages every parameter's gradient "
                "over the ranks, but sharded proxies are a different block per rank; use engine.name=ddp")
        self.module, self.env, self.torch_optimizer = module, env, optimizer
        # buffers DDP would broadcast from rank 0 before each forward (BatchNorm statistics), not per-rank ones
        self.buffers = [b for n, b in module.named_buffers() if n not in ignored]
        self.groups = [list(g["params"]) for g in optimizer.param_groups]  # ZeRO swaps these for partitions
        self.config = load_ds_config(config_path, per_rank_batch=per_rank_batch, world_size=env.world_size,
                                     grad_clip=grad_clip, autocast_dtype=amp_dtype)
        self.stage = self.config.get("zero_optimization", {}).get("stage", 0)
        self.ckpt_dir = os.path.join(checkpoint_dir, ENGINE_DIR)
        self.keep_last = keep_last
        adopt_process_group()
        self.ds: Any = None  # deepspeed's DeepSpeedEngine, made by rewrap()
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
            if zero_optimizer(self.ds) is not None:
                saved = export_zero_state(self.ds)
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
            import_zero_state(self.ds, saved)
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
            collectives.broadcast_(flat, 0)
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
        collectives.barrier()
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
        from trainer.safe_load import UnsafeFileError, check_torch_files
        try:  # DeepSpeed unpickles its files in full: refuse one that would run code, on every rank alike
            check_torch_files(os.path.join(ds_dir, ref["tag"]))
            tag = self._to_universal(ds_dir, ref["tag"]) if universal else ref["tag"]
            if universal:
                check_torch_files(os.path.join(ds_dir, tag))
        except UnsafeFileError as e:
            e.same_on_every_rank = True
            raise
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
        status = None
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
                status = (f"resume on {self.env.world_size} ranks: converting {ds_dir}/{tag} to DeepSpeed's "
                          f"universal checkpoint failed:\n{proc.stderr[-2000:]}")
        status = collectives.broadcast_object(status)
        if status:
            raise RuntimeError(status)
        return out

    def full_optimizer_state(self) -> dict:
        """{parameter name: {state key: full fp32 tensor}} of the groups that stepped. Collective at ZeRO 1/2."""
        names = {p: n for n, p in self.module.named_parameters()}
        if zero_optimizer(self.ds) is not None:
            per_param = export_zero_state(self.ds)["params"]
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
