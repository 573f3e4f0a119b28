"""The training loop: `Trainer(parts).fit()` trains, evaluates and checkpoints the parts that trainer/build.py made.

Read top to bottom: `fit` is the epoch loop, `train_epoch` holds the step (four lines). The loop never reads the
config: it gets built parts and a `Schedule` of plain numbers. Rank 0 alone writes the run directory, checkpoints,
logs and the progress bar; every rank steps in lockstep (equal batch counts from data_shards, and one all-reduce
of the stop flag per step so that all ranks stop at the same step).
"""
from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tqdm import tqdm

import collectives
from trainer.errors import USER_ERRORS, UserError, is_divergence, is_out_of_memory, one_line, out_of_memory
from trainer.train_state import DivergedError, Position, Trained, TrainState, lr_advice

if TYPE_CHECKING:  # the build step imports this module
    from torch import nn

    from trainer.distributed import DistEnv
    from trainer.evaluation import EvalResult
    from trainer.selection import BestCheckpoint
    from trainer.summary import RunReport
    from trainer.tracking import Tracker

# The training loss and its parts are logged as Train/loss, Train/loss_s, Train/loss_p: MLflow's run page orders
# its chart sections by name, byte by byte, so "Train" comes first (before eval/, lr/, proxy/).
TRAIN_PREFIX = "Train/"

__all__ = ["DivergedError", "Parts", "Schedule", "StopFlag", "Trainer"]


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


class StopFlag:
    """A stop request -> finish the step, checkpoint, exit cleanly (status 0): SIGTERM / SIGUSR1 (how SLURM and
    torchrun stop or preempt) and SIGINT (Ctrl-C). A second Ctrl-C stops at once (KeyboardInterrupt: no
    checkpoint, status 130); SIGINTs within SAME_PRESS_S of the first are that same press (the terminal's and the
    one torchrun forwards to its workers). Further SIGTERM / SIGUSR1 while a stop is under way change nothing: a
    launcher that repeats its signal does not turn the clean stop into death by signal, not even after
    `restore()`."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    SAME_PRESS_S = 1.0

    def __init__(self) -> None:
        self.raised = False
        self.signal: int | None = None  # the first stop signal received
        self._first_interrupt: float | None = None
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is None:
                self._first_interrupt = now
            elif now - self._first_interrupt > self.SAME_PRESS_S:  # a second Ctrl-C: stop now
                signal.signal(signal.SIGINT, signal.SIG_DFL)  # a third one kills, whatever Python is doing
                raise KeyboardInterrupt
        self.raised = True
        self.signal = self.signal or signum

    @property
    def reason(self) -> str:
        if not self.signal:
            return ""
        return "Ctrl-C (SIGINT)" if self.signal == signal.SIGINT else signal.Signals(self.signal).name

    def restore(self):
        """Give back the handlers found at the start; once a stop is under way SIGTERM / SIGUSR1 stay ignored
        (the process is about to exit 0 on its own)."""
        for s, h in self._old.items():
            ignore = self.raised and s != signal.SIGINT and h in (signal.SIG_DFL, None)
            signal.signal(s, signal.SIG_IGN if ignore else (h if h is not None else signal.SIG_DFL))


@dataclass(frozen=True)
class Schedule:
    """When the loop does what, in epochs and optimizer steps (0 = never / no limit), from the config's train,
    eval, checkpoint and tracking sections."""
    epochs: int
    warmup_epochs: int
    max_steps: int = 0
    progress_every_steps: int = 10
    track_every_steps: int = 10
    eval_every_epochs: int = 1
    eval_at_start: bool = False
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    track_proxies: bool = False


class Loaders(Protocol):
    """The run's loaders as the loop uses them (made by the build step: trainer.build.RunLoaders)."""
    batches_per_epoch: int

    def train(self, epoch: int, start_batch: int) -> Any:
        """Batches start_batch.. of `epoch` on this rank (images and labels on the device)."""

    def eval(self) -> Any:
        """The test split's batches (images, labels, keys)."""

    def val(self) -> Any:
        """The val split's batches (images, labels, keys)."""

    def close(self) -> None:
        """Stop the loader workers."""


@dataclass
class Parts:
    """Everything the loop works with, made by trainer/build.py."""
    env: DistEnv
    trained: Trained  # embedder, criterion, module, optimizer, scheduler, engine
    loaders: Loaders  # trainer.build.RunLoaders
    state: TrainState  # checkpoints of the run directory
    tracker: Tracker
    report: RunReport
    schedule: Schedule
    stop: StopFlag
    pos: Position
    run_uid: str
    evaluate: Callable[[nn.Module, Iterable], EvalResult]  # collective; the evaluation options bound
    log: Callable[[str], None]  # prints on rank 0 only (build.log_line)
    amp_dtype: torch.dtype | None = None
    warm: bool = False  # in warm-up: only the head and the proxies learn
    # keys -> images of the test split, for the retrieval picture (rank 0)
    image_lookup: Callable[[list[str]], Mapping[str, Any]] | None = None
    best: BestCheckpoint | None = None  # with a val split (data.val_split)
    evaluate_val: Callable[[nn.Module, Iterable], EvalResult] | None = None  # `evaluate` on the val split
    test_at_end: bool = True  # with a val split: the test split once at the end, on the best checkpoint


class Trainer:
    """The run: `fit()` once. Attributes are the parts (see `Parts`); `pos` advances as it trains."""

    def __init__(self, parts: Parts):
        self.parts, self.env, self.schedule = parts, parts.env, parts.schedule
        t = parts.trained
        self.embedder, self.criterion, self.module = t.embedder, t.criterion, t.module
        self.optimizer, self.scheduler, self.engine = t.optimizer, t.scheduler, t.engine
        self.loaders, self.state, self.tracker, self.report = parts.loaders, parts.state, parts.tracker, parts.report
        self.stop, self.pos, self.warm, self.amp = parts.stop, parts.pos, parts.warm, parts.amp_dtype
        self.batches_per_epoch = parts.loaders.batches_per_epoch
        self.metrics: dict = {}
        self.first_metrics: dict = {}
        self.first_bad_step = torch.tensor(math.inf, device=self.env.device)  # first step whose loss was not finite

    def close(self) -> None:
        """Give back the signal handlers, the loaders' workers and the run directory's lock (also after a failure)."""
        self.stop.restore()
        self.loaders.close()
        self.state.release()

    def fit(self) -> dict:
        """The whole run. Returns the last evaluation's metrics (on rank 0; {} elsewhere)."""
        s, pos = self.schedule, self.pos
        try:
            if pos.epoch >= s.epochs:  # a finished run started again: say so, train nothing
                self.tracker.close(status="FINISHED")
                return self.report.already_complete()
            if s.max_steps and pos.step >= s.max_steps:
                self.log(f"train.max_steps={s.max_steps} already reached (step {pos.step}): nothing to train; "
                         f"raise train.max_steps to go on")
                self.tracker.close(status="FINISHED")
                return self.metrics
            if s.eval_at_start and pos.step == 0:
                self.first_metrics = self.evaluate("before training")
            while pos.epoch < s.epochs:
                if self.warm and pos.epoch >= s.warmup_epochs:  # warm-up over: the backbone learns too
                    self.warm = False
                    self.embedder.set_backbone_trainable(True)
                    self.engine.rewrap()
                if pos.batch < self.batches_per_epoch and not self.train_epoch():
                    self.save()  # preempted (or train.max_steps): checkpoint where we are and leave
                    by = f" by {self.stop.reason}" if self.stop.raised else ""
                    self.log(f"stopped at epoch {pos.epoch} batch {pos.batch} (step {pos.step}){by}; checkpoint "
                             f"saved: {self.state.latest()}" + ("; to resume, run the same command again" if by
                                                                 else ""))
                    self.tracker.close(status="KILLED")
                    return self.metrics
                self.scheduler.step()
                pos.epoch, pos.batch = pos.epoch + 1, 0
                last = pos.epoch == s.epochs
                if last or (s.checkpoint_every_epochs and pos.epoch % s.checkpoint_every_epochs == 0):
                    self.save()  # before the evaluation: an evaluation that fails loses no training
                if last or (s.eval_every_epochs and pos.epoch % s.eval_every_epochs == 0):
                    self.evaluate(f"epoch {pos.epoch}")
            if self.parts.best is not None:
                self.test_best()
            elif self.first_metrics and self.metrics:
                self.log("test Recall@1: {:.4f} before training -> {:.4f} after".format(
                    self.first_metrics["recall_at_1"], self.metrics["recall_at_1"]))
            self.tracker.log_model(self.embedder)
            self.tracker.close(status="FINISHED")
            self.report.end()  # rank 0: best and final Recall@1, where the run, its checkpoint and MLflow run are
            return self.metrics
        except KeyboardInterrupt:  # a second Ctrl-C: the user stopped it
            self.tracker.close(status="KILLED")
            raise
        except BaseException:
            self.tracker.close(status="FAILED")
            raise
        finally:
            self.close()

    def train_epoch(self) -> bool:
        """Batches pos.batch.. of epoch pos.epoch; advances `pos`. False when stopped early (signal, max_steps).
        Raises DivergedError at the first step whose loss is not finite, on every rank, before any save."""
        s, env, pos, engine = self.schedule, self.env, self.pos, self.engine
        collectives.set_phase(f"step {pos.step + 1} (epoch {pos.epoch}, batch {pos.batch})")
        batch = failed = None
        try:
            loader = self.loaders.train(pos.epoch, pos.batch)  # device batches; made once, its workers serve every
            batches = Timed(loader)                             # epoch
            batch, failed = self.next_batch(batches)
        except USER_ERRORS as e:  # a shard gone since the last epoch
            failed = e
        if collectives.any_ranks([failed is not None], env.device)[0]:
            self.save_then_raise(failed)
        autocast = torch.autocast(env.device.type, dtype=self.amp) if self.amp else nullcontext()
        bar = tqdm(total=len(loader), initial=pos.batch, disable=not env.is_main, dynamic_ncols=True,
                   desc=f"epoch {pos.epoch}" + (" (warm-up: head + proxies)" if self.warm else ""))
        self.module.train()
        seen, t0 = 0, time.perf_counter()
        while batch is not None:
            images, labels = batch
            try:
                with autocast:
                    loss = engine(images, labels)
                engine.backward(loss)
                engine.step()
            except (ValueError, RuntimeError) as e:  # weights already non-finite: the loss refuses, Adam overflows
                if is_out_of_memory(e):
                    bar.close()
                    raise out_of_memory(e, images, f"at step {pos.step + 1}",
                                        "train.batch_size or data.transform.image_size (or set train.amp)") from None
                if not is_divergence(e):
                    raise
                bar.close()
                raise DivergedError(f"step {pos.step + 1}: training diverged ({str(e).splitlines()[0][:120]}); "
                                    f"last good checkpoint: {self.state.latest() or 'none'}. "
                                    f"{lr_advice(self.state.config)}") from None
            pos.batch, pos.step, seen = pos.batch + 1, pos.step + 1, seen + labels.shape[0] * env.world_size
            self.first_bad_step = torch.where(torch.isfinite(loss.detach()), self.first_bad_step,
                                              self.first_bad_step.clamp(max=pos.step))
            batch, failed = self.next_batch(batches)  # read now: its failure travels with the step's flags
            stopped, diverged, data_failed = collectives.any_ranks([self.stop.raised, self.first_bad_step < math.inf,
                                                          failed is not None], env.device)
            if diverged:
                bar.close()
                self.diverged(self.first_bad_step)
            if data_failed:
                bar.close()
                self.save_then_raise(failed)
            bar.update(1)
            show = pos.step % s.progress_every_steps == 0 or pos.batch == len(loader)
            track = s.track_every_steps and pos.step % s.track_every_steps == 0
            if show or track:
                dt, t0 = time.perf_counter() - t0, time.perf_counter()
                self.log_step(loss, seen / dt, batches.wait / dt, bar)
                seen, batches.wait = 0, 0.0
            if s.checkpoint_every_steps and pos.step % s.checkpoint_every_steps == 0:
                self.save()
            if stopped or (s.max_steps and pos.step >= s.max_steps):
                bar.close()
                return False
            collectives.set_phase(f"step {pos.step + 1} (epoch {pos.epoch}, batch {pos.batch})")
        bar.close()
        return True

    @staticmethod
    def next_batch(batches) -> tuple[tuple | None, BaseException | None]:
        """(the next batch, None), (None, None) at the epoch's end, or (None, the user error reading it raised: a
        shard damaged or gone since the start)."""
        try:
            return next(batches), None
        except StopIteration:
            return None, None
        except USER_ERRORS as e:
            return None, e
        except RuntimeError as e:  # making the batch ran out of memory (torch.OutOfMemoryError is one too)
            if not is_out_of_memory(e):
                raise
            return None, out_of_memory(e, None, "making a training batch",
                                       "train.batch_size or data.transform.image_size")

    def save_then_raise(self, failed: BaseException | None) -> None:
        """Collective: a user error met between steps (the model state is that of the last step, consistent) on
        any rank: checkpoint first, as on SIGTERM, then stop every rank with that error, saying so."""
        errors = collectives.all_gather_object(one_line(failed) if failed is not None else None)
        first = next((r, msg) for r, msg in enumerate(errors) if msg is not None)
        self.save()
        where = f" (rank {first[0]})" if self.env.world_size > 1 else ""
        error = UserError(f"{first[1]}{where}; a checkpoint of step {self.pos.step} was saved first: "
                          f"{self.state.latest()}; fix the data, then run the same command again to resume")
        error.same_on_every_rank = True
        raise error

    def diverged(self, first_bad_step: torch.Tensor) -> None:
        """Collective: stop on every rank, naming the first bad step (the earliest over the ranks)."""
        bad = int(collectives.all_reduce_(first_bad_step.clone(), op="min").item())
        raise DivergedError(
            f"step {bad}: the training loss is not finite (nan/inf); training stopped at step {self.pos.step} and "
            f"nothing after step {bad - 1} was saved. Last good checkpoint: {self.state.latest() or 'none'}. "
            f"{lr_advice(self.state.config)}")

    def log_step(self, loss, img_per_s: float, data_wait: float, bar) -> None:
        logs = {f"{TRAIN_PREFIX}loss": loss.item(),
                **{f"{TRAIN_PREFIX}{k}": float(v) for k, v in self.criterion.last_parts.items()},
                **{f"lr/{g['name']}": g["lr"] for g in self.optimizer.param_groups},
                "img_per_s": img_per_s, "data_wait_share": data_wait, "epoch": self.pos.epoch}
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{img_per_s:.0f}", refresh=False)
        self.tracker.log_metrics(logs, self.pos.step)

    def evaluate(self, when: str) -> dict:
        """Collective. Retrieval metrics of the test split (of the val split when there is one: the best checkpoint
        by its metric is kept), printed and logged on rank 0; then the proxies' statistics."""
        collectives.set_phase(f"evaluation ({when})")
        collectives.broadcast_buffers(self.embedder)  # every rank embeds with rank 0's BatchNorm statistics
        best, evaluate_val = self.parts.best, self.parts.evaluate_val  # both made with a val split
        val = best is not None and evaluate_val is not None
        result = (evaluate_val(self.embedder, self.loaders.val()) if evaluate_val is not None and val else
                  self.parts.evaluate(self.embedder, self.loaders.eval()))
        self.embedder.train()
        if result.metrics:
            self.log(f"[{'val' if val else 'eval'} {when}] " + "  ".join(f"{k} {v:.4f}"
                                                                          for k, v in result.metrics.items()))
            self.tracker.log_evaluation(result, self.pos.step, self.pos.epoch, prefix="val" if val else "eval",
                                        image_lookup=None if val else self.parts.image_lookup)
            self.metrics = result.metrics
            self.report.evaluated(result.metrics, self.pos, split="val" if val else "test")
            if best is not None and val:
                best.consider(result.metrics, self.pos, self.embedder)
        if self.schedule.track_proxies:  # collective: the selection counts of every rank
            self.tracker.log_proxy_stats(self.criterion.proxy_statistics(), self.pos.step)
        self.criterion.reset_selection_counts()
        return self.metrics

    def test_best(self) -> None:
        """Collective, once at the end of a run with a val split: the best checkpoint's weights into the embedder,
        then the test split evaluated on them (unless eval.test is false), logged as `test/*`."""
        collectives.barrier()  # rank 0 has written the best weights
        record = self.parts.best.load_into(self.embedder) if self.parts.best is not None else None
        if record is None or not self.parts.test_at_end:
            return
        collectives.broadcast_buffers(self.embedder)
        result = self.parts.evaluate(self.embedder, self.loaders.eval())
        self.embedder.train()
        if result.metrics:
            self.log(f"[test, once, on the best val checkpoint of epoch {record['epoch']}] "
                     + "  ".join(f"{k} {v:.4f}" for k, v in result.metrics.items()))
            self.tracker.log_evaluation(result, self.pos.step, self.pos.epoch, prefix="test",
                                        image_lookup=self.parts.image_lookup)
            self.metrics = result.metrics
            self.report.evaluated(result.metrics, self.pos, split="test", selected=record)

    def save(self) -> None:
        """Collective: a checkpoint of the current position (trainer/train_state.py)."""
        s, pos = self.schedule, self.pos
        collectives.set_phase(f"checkpoint at step {pos.step}")
        last = pos.epoch >= s.epochs or bool(s.max_steps and pos.step >= s.max_steps)
        self.state.save(self.parts.trained, pos, tracker_run_ids=self.tracker.run_ids, run_uid=self.parts.run_uid,
                        last=last, stopping=self.stop.raised)

    def log(self, line: str) -> None:
        self.parts.log(line)
