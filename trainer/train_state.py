"""The run's state on disk: claim the run directory, find the checkpoint to resume and check it against the
config, then save and restore weights, proxies, optimizer, schedule, RNG states and the position in the data.

    state = TrainState(env, run_dir, checkpointer, fmt="dcp", async_save=False, config=cfg_dict, ...)
    saved = state.claim(resume=True, check_config=fn)     # collective; rank 0 locks the run directory
    pos = state.restore(saved, trained, apply_optim)      # collective: any world size
    state.save(trained, pos, tracker_run_ids, run_uid, last=..., stopping=...)   # collective

What a checkpoint holds is the dict of state parts of trainer/state_parts.py (model, criterion, optimizer,
scheduler, and any part registered there), built once per run over `Trained`: each gives its whole state for a
.pt file and its own share for a DCP folder, and takes them back; this file knows none of them by name.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

import collectives
from trainer.checkpoint import Checkpointer, CheckpointError, is_folder, load, rng_state, set_rng_state
from trainer.checkpoint_disk import ENGINE_DIR
from trainer.config import ConfigError
from trainer.dcp_checkpoint import read_meta
from trainer.errors import UserError
from trainer.resume import at_epoch_end
from trainer.run_dir import RunDir
from trainer.state_parts import StatePart, build_parts

if TYPE_CHECKING:
    from loss.criterion import Criterion
    from trainer.dcp_save import DCPSaver
    from trainer.engines import Engine
    from trainer.model import Embedder


class DivergedError(UserError):
    """The loss or the state to be saved is not finite: training stops, and nothing non-finite is saved."""


def lr_advice(config: dict) -> str:
    """The way out that ends every DivergedError message: the learning rates of the run's config dict to lower."""
    optim = config.get("optim") or {}
    lrs = f" (optim.lr={optim['lr']}, optim.proxy_lr={optim['proxy_lr']})" if {"lr", "proxy_lr"} <= set(optim) else ""
    return f"Lower the learning rates{lrs} or set train.grad_clip, then resume or start over"


@dataclass
class Position:
    """Where training continues: batch `batch` of epoch `epoch`; `step` optimizer steps done so far."""
    epoch: int = 0
    batch: int = 0
    step: int = 0


@dataclass
class Trained:
    """What a checkpoint holds the state of (the engine wraps `module`, which holds embedder and criterion)."""
    embedder: Embedder
    criterion: Criterion
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    engine: Engine
    parts: dict[str, StatePart] = field(init=False, repr=False)

    def __post_init__(self):
        self.parts = build_parts(self)  # what every checkpoint saves and loads (trainer/state_parts.py)


class TrainState:
    """Checkpoints of one run directory; see the module docstring. `log` prints on rank 0."""

    def __init__(self, env, run_dir: str, checkpointer: Checkpointer, *, fmt: str, async_save: bool, config: dict,
                 data_info: dict, batches_per_epoch: int, log: Callable[[str], None]):
        self.env, self.run_dir, self.ckpt, self.batches_per_epoch = env, run_dir, checkpointer, batches_per_epoch
        self.fmt, self.async_save, self.config, self.data_info, self.log = fmt, async_save, config, data_info, log
        self.run_lock: RunDir | None = None
        self.resumed_from: str | None = None
        self.dcp_saver: DCPSaver | None = None

    def claim(self, resume: bool, check_config: Callable[[dict, str, bool], list[str]]) -> dict | None:
        """Collective. Rank 0 takes the run directory's lock (another live trainer on it: refused), removes the
        temporaries of killed writes, then either finds the newest intact checkpoint and checks with
        `check_config(state, path, at_epoch_start)` that the current config may resume it, or (resume=False)
        moves an earlier run aside. Every rank gets the same outcome: the checkpoint's state, or the same UserError."""
        outcome: tuple[str | None, UserError | None] = (None, None)
        state = None
        if self.env.is_main:
            try:
                self.run_lock = RunDir(self.run_dir, self.ckpt.dir).claim()
                for tmp in self.ckpt.clean_temporaries():
                    self.log(f"removed {tmp} (a checkpoint write that was killed)")
                path: str | None = None
                if resume:
                    path, state = self.ckpt.find_latest(log=self.log, check=self.check_checkpoint)
                elif (archived := self.run_lock.archive_previous()) is not None:
                    self.log(f"checkpoint.resume=false: the earlier run's config.yaml and checkpoints moved to "
                             f"{archived} (nothing deleted); starting over")
                if state is not None and path is not None:
                    boundary = state["batch_in_epoch"] == 0 or at_epoch_end(state)
                    changes = check_config(state, path, boundary)
                    if changes:
                        self.log("resume: carried over from the current config: " + "; ".join(changes))
                outcome = (path, None)
            except UserError as e:
                e.same_on_every_rank = True  # every rank raises it; rank 0 alone prints it
                outcome = (None, e)
        path, error = collectives.broadcast_object(outcome)
        if error is not None:
            raise error
        if path is not None and state is None:
            state = read_meta(path) if is_folder(path) else load(path)
        self.resumed_from = path
        return state

    def check_checkpoint(self, state: dict) -> None:
        """More than the file itself: its config is readable, and an engine's own files beside it (DeepSpeed's
        folder, looked up in this run's checkpoint directory) are there. Raises CheckpointError."""
        try:
            state["config"]["train"]["batch_size"]
        except (KeyError, TypeError):
            raise CheckpointError("its config has no train.batch_size (not written by this trainer)") from None
        ref = state["optimizer"].get("deepspeed") if isinstance(state["optimizer"], dict) else None
        if ref is not None:
            folder = os.path.join(self.ckpt.dir, ENGINE_DIR, ref["tag"])
            if not os.path.isdir(folder) or not os.listdir(folder):
                raise CheckpointError(f"DeepSpeed's part of it, {folder}, is missing")

    def release(self) -> None:
        """Give back the run directory's lock (also after a failure)."""
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def latest(self) -> str | None:
        return self.ckpt.latest()

    def save(self, t: Trained, pos: Position, *, tracker_run_ids: dict[str, str], run_uid: str, last: bool,
             stopping: bool) -> None:
        """Collective (RNG states; each state part's whole state gathered for the torch format, e.g. sharded
        proxies and ZeRO optimizer state; with dcp every rank writes its own share). Raises DivergedError instead
        of saving when a weight or buffer is not finite (on any rank). With async_save the write goes on in the
        background, except for the run's `last` save (or when `stopping` on any rank), which waits for the disk."""
        crit, env = t.criterion, self.env
        modules: tuple[torch.nn.Module, ...] = (t.embedder, cast(torch.nn.Module, crit))
        tensors = [x for m in modules for x in m.state_dict().values()
                   if torch.is_tensor(x) and x.is_floating_point()]
        finite = torch.stack([torch.isfinite(x).all() for x in tensors]).all() if tensors else True
        bad, stopping = collectives.any_ranks([~finite if torch.is_tensor(finite) else False, stopping], env.device)
        if bad:
            raise DivergedError(
                f"step {pos.step}: a model weight, BatchNorm statistic or proxy is not finite (nan/inf): not saved. "
                f"Last good checkpoint: {self.latest() or 'none'}. {lr_advice(self.config)}")
        meta = dict(config=self.config, epoch=pos.epoch, step=pos.step, batch_in_epoch=pos.batch,
                    rng=collectives.all_gather_object(rng_state()),
                    tracker_run_ids=collectives.broadcast_object(tracker_run_ids),
                    world_size=env.world_size, run_uid=run_uid, state_parts=list(t.parts),
                    train_classes=self.data_info["classes"], train_samples=self.data_info["samples"],
                    train_class_names=self.data_info["class_names"], train_class_list=self.data_info.get("class_list"))
        if self.fmt == "dcp":
            from trainer.dcp_checkpoint import build_state
            from trainer.dcp_save import DCPSaver
            if self.dcp_saver is None:
                self.dcp_saver = DCPSaver(self.ckpt)
            sd = build_state(meta, t.parts, env.rank)
            try:
                self.dcp_saver.save(sd, pos.step, meta, async_save=self.async_save and not (last or stopping))
            except UserError as e:  # e.g. the disk is full: the same on every rank
                e.same_on_every_rank = True
                raise
            return
        whole = {key: part.full_state() for key, part in t.parts.items()}  # collective: cut rows gathered
        error = None
        if env.is_main:
            try:
                self.ckpt.save(dict(meta, **whole), pos.step)
            except UserError as e:  # e.g. the disk is full: every rank stops with it
                e.same_on_every_rank = True
                error = e
        error = collectives.broadcast_object(error)
        if error is not None:
            raise error

    def restore(self, state: dict, t: Trained, apply_optim: Callable[[], None]) -> Position:
        """Collective. Every state part (weights, proxies, optimizer, schedule, ...), RNG and position from `state`:
        a .pt checkpoint's dict, or a DCP folder's `trainer` entry, whose tensors every rank now loads for its own
        share (any world size). `apply_optim()` then puts the current config's optimizer hyperparameters on top.
        A part the checkpoint lacks (registered since it was written) starts fresh, said in one line."""
        dcp = state.get("format") == "dcp"
        if dcp:
            from trainer.dcp_checkpoint import SAVED_BEFORE_THE_LIST, load_train_state
            saved = state.get("state_parts", SAVED_BEFORE_THE_LIST)
            state = {**state, **load_train_state(state["path"], t.parts, saved)}
        elif self.fmt == "dcp":
            self.log(f"{self.resumed_from}: a torch-format checkpoint; it is read as it is, and the checkpoints from "
                     f"now on are DCP folders (checkpoint.format=dcp)")
        for key, part in t.parts.items():
            if key not in state:
                self.log(f"resume: {part.missing()}")
                continue
            try:
                part.load_local_state(state[key]) if dcp else part.load_full_state(state[key])  # dcp: this rank's
            except RuntimeError as e:  # a key no rule in trainer/resume.py knew of changed a shape (loss.pml.kwargs)
                lines = str(e).strip().splitlines()
                raise ConfigError(f"checkpoint.resume: {self.resumed_from} does not fit the current config "
                                  f"({(lines[1] if len(lines) > 1 else lines[0]).strip()}); resume with the config it "
                                  f"was written with (its config.yaml), or start a new run (another run.name=...)") \
                    from None
        apply_optim()  # changed learning rates carry over
        rngs = state["rng"]  # one per rank of the saving run; on another world size rank r takes r mod n
        set_rng_state(rngs[self.env.rank % len(rngs)])
        pos = Position(state["epoch"], state["batch_in_epoch"], state["step"])
        if at_epoch_end(state):  # saved after its last batch: the epoch's end work is next, whatever the batch now
            pos.batch = self.batches_per_epoch
        self.log(f"resumed from {self.resumed_from}: epoch {pos.epoch}, batch {pos.batch}, step {pos.step} "
                 f"(saved on {state['world_size']} ranks, now {self.env.world_size})")
        return pos
