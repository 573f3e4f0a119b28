"""The training loop: `Trainer(cfg, env).fit()` builds everything from the config, resumes, trains,
evaluates and checkpoints.

Read top to bottom: `__init__` builds the parts (each from its config section), `fit` is the epoch loop,
`train_epoch` holds the step (four lines). Rank 0 alone writes the run directory, checkpoints, logs and the
progress bar; every rank steps in lockstep (equal batch counts from data_shards, and one all-reduce of
the stop flag per step so that all ranks stop at the same step).
"""
from __future__ import annotations

import math
import os
import signal
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data_shards import eval_loader, read_manifest, train_loader
from loss import collectives as C
from trainer.checkpoint import Checkpointer, CheckpointError, is_folder, load, rng_state, set_rng_state
from trainer.config import ConfigError, check_world_size, to_dict, to_yaml
from trainer.dcp_checkpoint import read_meta
from trainer.engines import TrainModule, build_engine
from trainer.errors import UserError
from trainer.evaluate import evaluate
from trainer.model import build_model
from trainer.preflight import check_data
from trainer.resume import apply_optim_hyperparameters, at_epoch_end, check_resume, class_digest
from trainer.run_dir import RunDir
from trainer.summary import RunReport
from trainer.tracking import Tracker, shard_image_lookup


class DivergedError(UserError):
    """The loss or the state to be saved is not finite: training stops, and nothing non-finite is saved."""


class Timed:
    """Iterate `it`, adding up in `.wait` the seconds spent waiting for the next item (the data wait)."""

    def __init__(self, it):
        self.it, self.wait = iter(it), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.wait += time.perf_counter() - t


@dataclass
class Position:
    """Where training continues: batch `batch` of epoch `epoch`; `step` optimizer steps done so far."""
    epoch: int = 0
    batch: int = 0
    step: int = 0


class StopFlag:
    """SIGTERM / SIGUSR1 (how SLURM preempts) -> finish the step, checkpoint, exit cleanly."""

    def __init__(self):
        self.raised = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame):
        self.raised = True

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def build_criterion(cfg_loss, num_classes: int, dim: int):
    """ProxyGML in its distributed form `loss.mode` (local | gather | sharded) on the current group, or the
    pytorch-metric-learning loss `loss.name` (loss/baselines.py; mode gather: it sees the global batch)."""
    if cfg_loss.name != "proxygml":
        from omegaconf import OmegaConf

        from loss.baselines import MetricLoss
        return MetricLoss(cfg_loss.name, num_classes, dim, OmegaConf.to_container(cfg_loss.kwargs),
                          cfg_loss.miner or None, OmegaConf.to_container(cfg_loss.miner_kwargs),
                          gather=cfg_loss.mode == "gather")
    from loss.distributed import build_criterion
    return build_criterion(cfg_loss.mode, num_classes, dim, proxies_per_class=cfg_loss.proxies_per_class,
                           r=cfg_loss.r, lam=cfg_loss.lam, pos_mask=cfg_loss.pos_mask,
                           class_mask=cfg_loss.class_mask, proxy_reg=cfg_loss.proxy_reg, scale=cfg_loss.scale)


def build_optimizer(cfg_optim, embedder, criterion) -> torch.optim.Optimizer:
    """Three parameter groups with their own learning rates: backbone, embedding head, proxies."""
    groups = [dict(params=embedder.backbone_parameters(), lr=cfg_optim.lr, name="backbone"),
              dict(params=embedder.head_parameters(), lr=cfg_optim.head_lr, name="head"),
              dict(params=criterion.proxy_parameters(), lr=cfg_optim.proxy_lr,
                   name="proxies")]  # ProxyGML's proxies, or a baseline loss's own weights
    groups = [g for g in groups if g["params"]]
    wd = cfg_optim.weight_decay
    if cfg_optim.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg_optim.lr, momentum=cfg_optim.momentum, weight_decay=wd)
    opt = torch.optim.AdamW if cfg_optim.name == "adamw" else torch.optim.Adam
    return opt(groups, lr=cfg_optim.lr, eps=cfg_optim.eps, weight_decay=wd)


def amp_dtype(cfg_train, device: torch.device):
    if cfg_train.amp == "bf16" or (cfg_train.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def prepare_data(cfg, env) -> None:
    """Write a built-in dataset's shards (the demo's digits) on rank 0 if the data root has none yet."""
    manifest = os.path.join(cfg.data.root, cfg.data.train_split, "manifest.json")
    if cfg.data.prepare == "digits" and env.is_main and not os.path.exists(manifest):
        from filelock import FileLock

        from trainer.demo import write_digits_shards
        os.makedirs(cfg.data.root, exist_ok=True)
        with FileLock(os.path.join(cfg.data.root, ".prepare.lock")):  # two runs started at once on a new root
            if not os.path.exists(manifest):
                write_digits_shards(cfg.data.root)
    C.barrier()


class Trainer:
    def __init__(self, cfg, env):
        self.cfg, self.env = cfg, env
        self.stop = StopFlag()  # from the start: a preemption during setup still ends in a checkpoint
        self.run_lock: RunDir | None = None
        try:
            self._build(cfg, env)
        except BaseException:
            self.close()
            raise

    def _build(self, cfg, env) -> None:
        self.per_rank_batch = check_world_size(cfg, env.world_size)  # fail before any work
        self.run_dir = os.path.join(cfg.run.output_dir, cfg.run.name)
        if cfg.data.decode == "gpu":  # the device is known only now: fail before any work
            from data_shards.gpu_transforms import check_decode_device
            check_decode_device(cfg.data.decode, env.device)
        prepare_data(cfg, env)
        torch.manual_seed(cfg.run.seed)
        if cfg.run.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        self.train_dir = os.path.join(cfg.data.root, cfg.data.train_split)
        self.test_dir = os.path.join(cfg.data.root, cfg.data.test_split)
        train_manifest, self.test_manifest = read_manifest(self.train_dir), read_manifest(self.test_dir)
        check_data(cfg, train_manifest, self.test_manifest, env.world_size)  # what the manifests tell, now
        self.batches_per_epoch = train_manifest.num_samples // cfg.train.batch_size  # as data_shards counts
        self.data_info = {"classes": train_manifest.num_classes, "samples": train_manifest.num_samples,
                          "class_names": class_digest(train_manifest.class_names)}
        self.ckpt = Checkpointer(cfg.checkpoint.dir or os.path.join(self.run_dir, "checkpoints"),
                                 cfg.checkpoint.keep_last)
        state, self.resumed_from = self.claim_run_dir()  # before anything is written: lock, checks, config.yaml
        self.run_uid = state.get("run_uid") if state else None
        self.run_uid = self.run_uid or uuid.uuid4().hex

        self.embedder = build_model(cfg.model).to(env.device)
        self.criterion = build_criterion(cfg.loss, train_manifest.num_classes, cfg.model.dim).to(env.device)
        self.module = TrainModule(self.embedder, self.criterion, compile=cfg.train.compile)
        self.optimizer = build_optimizer(cfg.optim, self.embedder, self.criterion)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.optim.lr_milestones),
                                                              cfg.optim.lr_gamma)
        self.warm = (state["epoch"] if state else 0) < cfg.train.warmup_epochs
        self.embedder.set_backbone_trainable(not self.warm)  # before the engine: DDP fixes its parameter set
        self.engine = build_engine(cfg.engine.name, self.module, self.optimizer, env, grad_clip=cfg.train.grad_clip,
                                   find_unused_parameters=cfg.engine.find_unused_parameters,
                                   deepspeed_config=cfg.engine.deepspeed_config, per_rank_batch=self.per_rank_batch,
                                   amp_dtype=amp_dtype(cfg.train, env.device), checkpoint_dir=self.ckpt.dir,
                                   keep_last=cfg.checkpoint.keep_last)
        self.pos = self.restore(state) if state else Position()
        if env.is_main:  # only now: a checkpoint that does not fit the config has refused before (restore)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(cfg))
        self.tracker = Tracker(cfg.tracking, self.run_dir, rank=env.rank, config=to_dict(cfg),
                               world_size=env.world_size, resume_run_id=state["mlflow_run_id"] if state else None)
        self.images_of = shard_image_lookup(self.test_dir) if cfg.tracking.enabled and env.is_main else None
        self.amp = amp_dtype(cfg.train, env.device)
        self.metrics, self.first_metrics = {}, {}
        self.train_batches = self.eval_batches = None  # loaders, made at first use, closed by close()
        self.first_bad_step = torch.tensor(math.inf, device=env.device)  # first step whose loss was not finite
        self.report = RunReport.start(self)  # rank 0 says what the run is about to do

    def claim_run_dir(self) -> tuple[dict | None, str | None]:
        """Collective. Rank 0 takes the run directory's lock (another live trainer on it: refused), removes the
        temporaries of killed writes, then either finds the newest intact checkpoint and checks that the current
        config may resume it, or (checkpoint.resume=false) moves an earlier run aside; only then writes
        config.yaml. Every rank gets the same outcome: the checkpoint's state and path, or the same UserError."""
        cfg, env = self.cfg, self.env
        outcome = (None, None)
        state = None
        if env.is_main:
            try:
                self.run_lock = RunDir(self.run_dir, self.ckpt.dir).claim()
                for tmp in self.ckpt.clean_temporaries():
                    self.log(f"removed {tmp} (a checkpoint write that was killed)")
                path = None
                if cfg.checkpoint.resume:
                    path, state = self.ckpt.find_latest(log=self.log, check=self.check_checkpoint)
                elif (archived := self.run_lock.archive_previous()) is not None:
                    self.log(f"checkpoint.resume=false: the earlier run's config.yaml and checkpoints moved to "
                             f"{archived} (nothing deleted); starting over")
                if state is not None:
                    boundary = state["batch_in_epoch"] == 0 or at_epoch_end(state)
                    changes = check_resume(state["config"], cfg, path, at_epoch_start=boundary,
                                           saved_data={"classes": state.get("train_classes"),
                                                       "samples": state.get("train_samples"),
                                                       "class_names": state.get("train_class_names")},
                                           data_now=self.data_info)
                    if changes:
                        self.log("resume: carried over from the current config: " + "; ".join(changes))
                outcome = (path, None)
            except UserError as e:
                e.same_on_every_rank = True  # every rank raises it; rank 0 alone prints it
                outcome = (None, e)
        path, error = C.broadcast_object(outcome)
        if error is not None:
            raise error
        if path is not None and state is None:
            state = read_meta(path) if is_folder(path) else load(path)
        return state, path

    def check_checkpoint(self, state: dict) -> None:
        """More than the file itself: its config is readable, and an engine's own files beside it (DeepSpeed's
        folder, looked up in this run's checkpoint directory) are there. Raises CheckpointError."""
        try:
            state["config"]["train"]["batch_size"]
        except (KeyError, TypeError):
            raise CheckpointError("its config has no train.batch_size (not written by this trainer)") from None
        ref = state["optimizer"].get("deepspeed") if isinstance(state["optimizer"], dict) else None
        if ref is not None:
            folder = os.path.join(self.ckpt.dir, "deepspeed", ref["tag"])
            if not os.path.isdir(folder) or not os.listdir(folder):
                raise CheckpointError(f"DeepSpeed's part of it, {folder}, is missing")

    def close(self) -> None:
        """Give back the signal handlers and the run directory's lock (also after a failure)."""
        self.stop.restore()
        for name in ("train_batches", "eval_batches"):  # the loaders: their persistent workers end now
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
            setattr(self, name, None)
        if self.run_lock is not None:
            self.run_lock.release()
            self.run_lock = None

    def fit(self) -> dict:
        """The whole run. Returns the last evaluation's metrics (on rank 0; {} elsewhere)."""
        cfg, pos, stop = self.cfg, self.pos, self.stop
        try:
            if pos.epoch >= cfg.train.epochs:  # a finished run started again: say so, train nothing
                self.tracker.close(status="FINISHED")
                return self.report.already_complete()
            if cfg.train.max_steps and pos.step >= cfg.train.max_steps:
                self.log(f"train.max_steps={cfg.train.max_steps} already reached (step {pos.step}): nothing to train; "
                         f"raise train.max_steps to go on")
                self.tracker.close(status="FINISHED")
                return self.metrics
            if cfg.eval.at_start and pos.step == 0:
                self.first_metrics = self.evaluate("before training")
            while pos.epoch < cfg.train.epochs:
                if self.warm and pos.epoch >= cfg.train.warmup_epochs:  # warm-up over: the backbone learns too
                    self.warm = False
                    self.embedder.set_backbone_trainable(True)
                    self.engine.rewrap()
                if pos.batch < self.batches_per_epoch and not self.train_epoch(stop):
                    self.save()  # preempted (or train.max_steps): checkpoint where we are and leave
                    self.log(f"stopped at epoch {pos.epoch} batch {pos.batch} (step {pos.step}); checkpoint saved")
                    self.tracker.close(status="KILLED")
                    return self.metrics
                self.scheduler.step()
                pos.epoch, pos.batch = pos.epoch + 1, 0
                last = pos.epoch == cfg.train.epochs
                if last or (cfg.checkpoint.every_epochs and pos.epoch % cfg.checkpoint.every_epochs == 0):
                    self.save()  # before the evaluation: an evaluation that fails loses no training
                if last or (cfg.eval.every_epochs and pos.epoch % cfg.eval.every_epochs == 0):
                    self.evaluate(f"epoch {pos.epoch}")
            if self.first_metrics and self.metrics:
                self.log("test Recall@1: {:.4f} before training -> {:.4f} after".format(
                    self.first_metrics["recall_at_1"], self.metrics["recall_at_1"]))
            self.tracker.log_model(self.embedder)
            self.tracker.close(status="FINISHED")
            self.report.end()  # rank 0: best and final Recall@1, where the run, its checkpoint and MLflow run are
            return self.metrics
        except BaseException:
            self.tracker.close(status="FAILED")
            raise
        finally:
            self.close()

    def train_epoch(self, stop: StopFlag) -> bool:
        """Batches pos.batch.. of epoch pos.epoch; advances `pos`. False when stopped early (signal, max_steps).
        Raises DivergedError at the first step whose loss is not finite, on every rank, before any save."""
        cfg, env, pos, engine = self.cfg, self.env, self.pos, self.engine
        loader = getattr(self, "train_batches", None)  # made once: its workers serve every epoch
        if loader is None:
            loader = self.train_batches = train_loader(
                self.train_dir, batch_size=self.per_rank_batch, num_workers=cfg.data.num_workers, seed=cfg.run.seed,
                epoch=pos.epoch, rank=env.rank, world_size=env.world_size, transform=cfg.data.transform,
                start_batch=pos.batch, decode="none" if cfg.data.decode == "gpu" else "cpu", verify=cfg.data.verify,
                persistent_workers=cfg.data.persistent_workers, draft=cfg.data.draft_decode,
                sampler=cfg.data.sampler, m_per_class=cfg.data.m_per_class, sampler_window=cfg.data.sampler_window)
        else:
            loader.set_epoch(pos.epoch, pos.batch)
        autocast = torch.autocast(env.device.type, dtype=self.amp) if self.amp else nullcontext()
        bar = tqdm(total=len(loader), initial=pos.batch, disable=not env.is_main, dynamic_ncols=True,
                   desc=f"epoch {pos.epoch}" + (" (warm-up: head + proxies)" if self.warm else ""))
        self.module.train()
        seen, t0, batches = 0, time.perf_counter(), Timed(self.device_batches(loader))
        for images, labels in batches:
            try:
                with autocast:
                    loss = engine(images, labels)
                engine.backward(loss)
                engine.step()
            except (ValueError, RuntimeError) as e:  # weights already non-finite: the loss refuses, Adam overflows
                if not any(w in str(e) for w in ("non-finite", "without overflow")):
                    raise
                bar.close()
                raise DivergedError(f"step {pos.step + 1}: training diverged ({str(e).splitlines()[0][:120]}); "
                                    f"last good checkpoint: {self.ckpt.latest() or 'none'}. Lower the learning rates "
                                    f"(optim.lr={cfg.optim.lr}, optim.proxy_lr={cfg.optim.proxy_lr}) or set "
                                    f"train.grad_clip, then resume or start over") from None
            pos.batch, pos.step, seen = pos.batch + 1, pos.step + 1, seen + labels.shape[0] * env.world_size
            self.first_bad_step = torch.where(torch.isfinite(loss.detach()), self.first_bad_step,
                                              self.first_bad_step.clamp(max=pos.step))
            stopped, diverged = C.any_ranks([stop.raised, self.first_bad_step < math.inf], env.device)
            if diverged:
                bar.close()
                self.diverged(self.first_bad_step)
            bar.update(1)
            show = pos.step % cfg.train.log_every_steps == 0 or pos.batch == len(loader)
            track = cfg.tracking.log_every_steps and pos.step % cfg.tracking.log_every_steps == 0
            if show or track:
                dt, t0 = time.perf_counter() - t0, time.perf_counter()
                self.log_step(loss, seen / dt, batches.wait / dt, bar)
                seen, batches.wait = 0, 0.0
            if cfg.checkpoint.every_steps and pos.step % cfg.checkpoint.every_steps == 0:
                self.save()
            if stopped or (cfg.train.max_steps and pos.step >= cfg.train.max_steps):
                bar.close()
                return False
        bar.close()
        return True

    def diverged(self, first_bad_step: torch.Tensor) -> None:
        """Collective: stop on every rank, naming the first bad step (the earliest over the ranks)."""
        bad = C.all_reduce_(first_bad_step.clone(), op=torch.distributed.ReduceOp.MIN)
        cfg = self.cfg
        raise DivergedError(
            f"step {int(bad.item())}: the training loss is not finite (nan/inf); training stopped at step "
            f"{self.pos.step} and nothing after step {int(bad.item()) - 1} was saved. Last good checkpoint: "
            f"{self.ckpt.latest() or 'none'}. Lower the learning rates (optim.lr={cfg.optim.lr}, "
            f"optim.proxy_lr={cfg.optim.proxy_lr}) or set train.grad_clip, then resume or start over")

    def device_batches(self, loader):
        """(images, labels) on the device: CPU-decoded tensors moved over, or bytes decoded on the GPU."""
        if self.cfg.data.decode == "gpu":
            from data_shards.gpu_transforms import device_batches
            yield from device_batches(loader, self.cfg.data.transform, self.env.device, train=True,
                                      seed=self.cfg.run.seed + self.env.rank)
            return
        for images, labels in loader:
            yield images.to(self.env.device, non_blocking=True), labels.to(self.env.device, non_blocking=True)

    def log_step(self, loss, img_per_s: float, data_wait: float, bar) -> None:
        logs = {"loss": loss.item(), **{k: float(v) for k, v in self.criterion.last_parts.items()},
                **{f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups},
                "img_per_s": img_per_s, "data_wait_share": data_wait, "epoch": self.pos.epoch}
        bar.set_postfix(loss=f"{logs['loss']:.4f}", img_s=f"{img_per_s:.0f}", refresh=False)
        self.tracker.log_metrics(logs, self.pos.step)

    def evaluate(self, when: str) -> dict:
        """Collective. Test-split retrieval metrics, printed and logged on rank 0."""
        cfg, env = self.cfg, self.env
        if self.eval_batches is None:  # made once: with persistent workers, every evaluation uses the same ones
            self.eval_batches = eval_loader(
                self.test_dir, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, rank=env.rank,
                world_size=env.world_size, transform=cfg.data.transform,
                decode="none" if cfg.data.decode == "gpu" else "cpu", verify=cfg.data.verify,
                persistent_workers=cfg.data.persistent_workers)
        loader = self.eval_batches
        if cfg.data.decode == "gpu":
            from data_shards.gpu_transforms import device_batches
            loader = device_batches(loader, cfg.data.transform, env.device, train=False)
        C.broadcast_buffers(self.embedder)  # every rank embeds with rank 0's BatchNorm statistics
        result = evaluate(self.embedder, loader, device=env.device, cfg_eval=cfg.eval,
                          class_names=self.test_manifest.class_names, amp_dtype=self.amp)
        self.embedder.train()
        if result.metrics:
            self.log(f"[eval {when}] " + "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
            self.tracker.log_evaluation(result, self.pos.step, self.pos.epoch, image_lookup=self.images_of)
            self.metrics = result.metrics
            self.report.evaluated(result.metrics, self.pos)
        self.tracker.log_proxy_stats(self.criterion, self.pos.step)
        return self.metrics

    def save(self) -> None:
        """Collective (RNG states; sharded proxies and ZeRO optimizer state gathered for checkpoint.format=torch;
        with dcp every rank writes its own block). Raises DivergedError instead of saving when a weight or buffer
        is not finite (on any rank). With checkpoint.async_save the write goes on in the background, except for
        the run's last save (end, train.max_steps, SIGTERM/SIGUSR1 on any rank), which waits for the disk."""
        crit, pos, env = self.criterion, self.pos, self.env
        tensors = [t for m in (self.embedder, crit) for t in m.state_dict().values()
                   if torch.is_tensor(t) and t.is_floating_point()]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else True
        bad, stopping = C.any_ranks([~finite if torch.is_tensor(finite) else False, self.stop.raised], env.device)
        if bad:
            raise DivergedError(
                f"step {pos.step}: a model weight, BatchNorm statistic or proxy is not finite (nan/inf): not saved. "
                f"Last good checkpoint: {self.ckpt.latest() or 'none'}. Lower the learning rates "
                f"(optim.lr={self.cfg.optim.lr}) or set train.grad_clip, then resume or start over")
        meta = dict(config=to_dict(self.cfg), epoch=pos.epoch, step=pos.step, batch_in_epoch=pos.batch,
                    rng=C.all_gather_object(rng_state()), mlflow_run_id=C.broadcast_object(self.tracker.run_id),
                    world_size=env.world_size, run_uid=self.run_uid, train_classes=self.data_info["classes"],
                    train_samples=self.data_info["samples"], train_class_names=self.data_info["class_names"])
        if self.cfg.checkpoint.format == "dcp":
            from trainer.dcp_checkpoint import DCPSaver, build_state, param_names
            if getattr(self, "dcp_saver", None) is None:
                self.dcp_saver = DCPSaver(self.ckpt)
            last = stopping or pos.epoch >= self.cfg.train.epochs or bool(
                self.cfg.train.max_steps and pos.step >= self.cfg.train.max_steps)
            sd = build_state(meta, self.embedder, crit, self.engine.optimizer_state_dict(),
                             lambda: param_names(self.module, self.optimizer), self.scheduler.state_dict(), env.rank)
            try:
                self.dcp_saver.save(sd, pos.step, meta, async_save=self.cfg.checkpoint.async_save and not last)
            except UserError as e:  # e.g. the disk is full: the same on every rank
                e.same_on_every_rank = True
                raise
            return
        crit_sd = crit.full_state_dict()
        optimizer_sd = crit.optimizer_state_to_full(self.engine.optimizer_state_dict())  # sharded: the full table
        error = None
        if env.is_main:
            try:
                self.ckpt.save(dict(meta, model=self.embedder.state_dict(), criterion=crit_sd,
                                    optimizer=optimizer_sd, scheduler=self.scheduler.state_dict()), pos.step)
            except UserError as e:  # e.g. the disk is full: every rank stops with it
                e.same_on_every_rank = True
                error = e
        error = C.broadcast_object(error)
        if error is not None:
            raise error

    def restore(self, state: dict) -> Position:
        """Collective. Weights, optimizer, schedule, RNG and position from `state`: a .pt checkpoint's dict, or a
        DCP folder's `trainer` entry, whose tensors every rank now loads for its own share (any world size)."""
        crit = self.criterion
        if state.get("format") == "dcp":
            from trainer.dcp_checkpoint import load_train_state
            state = {**state, **load_train_state(state["path"], self.module, self.optimizer, crit)}
        elif self.cfg.checkpoint.format == "dcp":
            self.log(f"{self.resumed_from}: a torch-format checkpoint; it is read as it is, and the checkpoints from "
                     f"now on are DCP folders (checkpoint.format=dcp)")
        try:
            self.embedder.load_state_dict(state["model"])
            if state.get("format") == "dcp":  # already this rank's block when sharded
                crit.load_local_state_dict(state["criterion"])
            else:
                crit.load_full_state_dict(state["criterion"])
        except RuntimeError as e:  # a key no rule in trainer/resume.py knew of changed a shape (e.g. loss.kwargs)
            lines = str(e).strip().splitlines()
            raise ConfigError(f"checkpoint.resume: {self.resumed_from} does not fit the current config "
                              f"({(lines[1] if len(lines) > 1 else lines[0]).strip()}); resume with the config it was "
                              f"written with (its config.yaml), or start a new run (another run.name=...)") from None
        optimizer_sd = state["optimizer"]
        if state.get("format") != "dcp":  # the full table: take this rank's block when sharded
            optimizer_sd = crit.optimizer_state_from_full(optimizer_sd)
        self.engine.load_optimizer_state_dict(optimizer_sd)
        self.scheduler.load_state_dict(state["scheduler"])
        apply_optim_hyperparameters(self.optimizer, self.scheduler, self.cfg.optim)  # changed lrs carry over
        rngs = state["rng"]  # one per rank of the saving run; on another world size rank r takes r mod n
        set_rng_state(rngs[self.env.rank % len(rngs)])
        pos = Position(state["epoch"], state["batch_in_epoch"], state["step"])
        if at_epoch_end(state):  # saved after its last batch: the epoch's end work is next, whatever the batch now
            pos.batch = self.batches_per_epoch
        self.log(f"resumed from {self.resumed_from}: epoch {pos.epoch}, batch {pos.batch}, step {pos.step} "
                 f"(saved on {state['world_size']} ranks, now {self.env.world_size})")
        return pos

    def log(self, line: str) -> None:
        if self.env.is_main:
            tqdm.write(line)


def train(cfg, env) -> dict:
    return Trainer(cfg, env).fit()
