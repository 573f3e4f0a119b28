"""The tracker's sender threads: one per tracking backend (trainer.tracking.backend), each making every call to its
backend of a run, in order, off the training thread. A failing, unreachable or hung store never stops nor stalls
training: the first failure warns once, later events are appended to the backend's queue
`<run_dir>/tracking/<backend>/pending.jsonl`, the store is retried every RETRY_INTERVAL_S and, once it answers, gets
what is pending. A local store (SQLite file, folder) has no network to wait for: it is only ever busy (other runs
writing the same file), so its waits are driven by progress, not by a clock: the start waits for the run to be
created and close() for every event to be delivered, as long as the store answers something within LOCAL_STALL_S;
meanwhile a busy answer is retried every LOCAL_RETRY_INTERVAL_S without a warning. The backend's run id and what
reaches its store again are kept in `<run_dir>/tracking/<backend>/state.json` (read by resume and by upload); the
recall history of the run in `<run_dir>/tracking/state.json`.

Earlier versions kept one queue, MLflow's, in `tracking/` itself (state.json with its run id, pending.jsonl,
model/): upgrade_layout moves it to `tracking/mlflow/`, where it is resumed and uploaded as any other."""
from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
import warnings
from pathlib import Path

from trainer.redact import redact
from trainer.tracking.backend import TrackingBackend
from trainer.tracking.store import OFFLINE_MODEL_DIR, save_offline_model

log = logging.getLogger("trainer.tracking")

TRACKING_DIR = "tracking"  # under the run directory: state.json, artifacts/, one queue folder per backend
LEGACY_BACKEND = "mlflow"  # the backend of the queue that earlier versions kept in tracking/ itself
RETRY_INTERVAL_S = 60.0  # while offline, ask the server again at most this often
LOCAL_RETRY_INTERVAL_S = 2.0  # the same for a local store (SQLite file): busy for a moment, not down
START_WAIT_S = 30.0  # Tracker() waits at most this long for a server's first answer (run id)
CLOSE_WAIT_S = 30.0  # close() waits at most this long for the sender thread to deliver what is queued to a server
LOCAL_STALL_S = 300.0  # a local store that stays busy (or hung) this long without a single answer is given up


def read_state(folder: Path) -> dict:
    """The state.json of a tracking folder or queue ({} when there is none yet)."""
    path = folder / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(folder: Path, state: dict) -> None:
    """Replace `folder/state.json` at once (a reader sees the old file or the new one)."""
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(folder / "state.json")


def upgrade_layout(tracking_dir: Path) -> None:
    """Move a queue of the earlier layout (tracking/state.json holding the MLflow run id, tracking/pending.jsonl,
    tracking/model/) to `tracking/mlflow/`; the recall history stays in tracking/state.json. Nothing to do for a
    folder of this layout or without state. Safe to repeat after an interruption."""
    state = read_state(tracking_dir)
    if "run_id" not in state:
        return
    folder = tracking_dir / LEGACY_BACKEND
    folder.mkdir(exist_ok=True)
    history = state.pop("eval_history", [])
    write_state(folder, state)
    for name in ("pending.jsonl", OFFLINE_MODEL_DIR):
        if (tracking_dir / name).exists() and not (folder / name).exists():
            (tracking_dir / name).replace(folder / name)
    write_state(tracking_dir, {"eval_history": history})


def replay(backend: TrackingBackend, run_id: str, pending: Path) -> int:
    """Apply the events of a pending file in order; the file keeps only those not yet applied. Returns how many
    were applied; raises what the backend raised."""
    if not pending.exists():
        return 0
    events = [json.loads(line) for line in pending.read_text().splitlines() if line.strip()]
    done = 0
    try:
        for event in events:
            backend.apply(run_id, event, pending.parent)
            done += 1
    finally:
        rest = events[done:]
        if rest:
            pending.write_text("".join(json.dumps(e) + "\n" for e in rest))
        else:
            pending.unlink()
    return done


class Sender:
    """Delivers a run's events to one backend from a daemon thread; keeps them in its queue while it fails.

    backend: the TrackingBackend (made, not connected); folder: its queue, `<run_dir>/tracking/<name>`.
    run_id: continue that run (else the one of the queue's state.json when events are still pending there, else a
    new run). Waits at most START_WAIT_S for a server's first answer (a local store: while it makes progress)."""

    def __init__(self, backend: TrackingBackend, folder: Path, run_dir: Path, run_id: str | None):
        self.backend = backend
        self.run_dir = Path(run_dir)
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending = self.dir / "pending.jsonl"
        state = read_state(self.dir)
        self.run_id = run_id or (state.get("run_id") if self.pending.exists() else None)
        self.resumed = bool(self.run_id) and state.get("run_id") == self.run_id  # the same run goes on
        self.online = False
        self.refused: str | None = None  # the store refused the login at the first connection: why
        self._warned = False
        self._abandoned = False
        self._last_try = -math.inf
        self._error: BaseException | None = None  # the store's last error
        self._local = backend.local
        self._lock = threading.Lock()  # pending.jsonl and state.json are written by both threads
        self.write_state()
        self._queue: queue.Queue = queue.Queue()
        self._started = threading.Event()
        self._progress = time.monotonic()  # the last answer of the store (a call that returned)
        self._worker = threading.Thread(target=self._work, name=f"{self.dir.name}-tracker", daemon=True)
        self._worker.start()
        self._wait_start()  # the run id, when the store answers in time

    def _wait_start(self) -> None:
        """A server: at most START_WAIT_S. A local store: until the run exists, unless it makes no progress."""
        if not self._local:
            self._started.wait(START_WAIT_S)
            return
        while not self._started.wait(1.0) and not self._stalled():
            pass

    def _stalled(self) -> bool:
        return time.monotonic() - self._progress > LOCAL_STALL_S

    def emit(self, event: dict) -> None:
        self._queue.put(event)

    def wait_run_id(self) -> str | None:
        """The run id, waiting up to START_WAIT_S for the thread's first connection attempt."""
        if not self._started.is_set():
            self._wait_start()
        return self.run_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event emitted so far is delivered (or kept locally); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def close(self, end: dict) -> None:
        """Queue the run's `end` event, wait at most CLOSE_WAIT_S, keep locally what is left; says how to upload
        what could not be sent."""
        self.emit(end)
        self._queue.put(None)
        if self._local:  # no network: wait while the store answers (other runs may hold it for a while)
            while self._worker.is_alive() and not self._stalled():
                self._worker.join(1.0)
        else:
            self._worker.join(CLOSE_WAIT_S)
        if self._worker.is_alive():  # stuck in a call to a hung server: keep the rest locally
            self._abandoned = True
            waited = f"for {LOCAL_STALL_S:.0f} s" if self._local else f"within {CLOSE_WAIT_S:.0f} s"
            warnings.warn(redact(f"Tracker: {self.backend} did not answer {waited}; the events not sent yet are "
                                 "kept locally"), RuntimeWarning, stacklevel=3)
            while True:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    break
                if event is not None:
                    self._keep(event)
        if self.pending.exists():
            where = "the local store did not take them" if self._local else "tracking server unreachable"
            warnings.warn(redact(f"Tracker: {where} ({self.backend.where}), events kept in {self.pending}; upload "
                                 f"them with: python -m trainer.tracking upload {self.run_dir}"), RuntimeWarning,
                          stacklevel=3)

    def abort(self) -> None:
        """End the thread without another call to the store (after a refused login)."""
        self._abandoned = True
        self._queue.put(None)

    def write_state(self) -> None:
        """The queue's state.json: the run id and what reaches the store again (TrackingBackend.state)."""
        with self._lock:
            write_state(self.dir, {**read_state(self.dir), **self.backend.state(), "run_id": self.run_id})

    # -- the thread

    def _connect(self) -> bool:
        self._last_try = time.monotonic()
        try:
            self.run_id = self.backend.open(self.run_id)
            self.write_state()
            self._progress = time.monotonic()
            replay(self.backend, self.run_id, self.pending)
        except Exception as e:
            if not self._started.is_set():  # at start: the Tracker says it, no training
                self.refused = self.backend.refusal(e)
                if self.refused is not None:
                    return False
            self._fail(e)
            return False
        if not self.online and self._warned:
            log.warning("Tracker: %s reachable again; pending events uploaded", redact(str(self.backend)))
        self.online = True
        return True

    @property
    def _retry_s(self) -> float:
        return LOCAL_RETRY_INTERVAL_S if self._local else RETRY_INTERVAL_S

    def _reconnect_due(self) -> bool:
        if time.monotonic() - self._last_try < self._retry_s:
            return False
        return self._connect()

    def _busy(self) -> bool:
        return self._local and self._error is not None and self.backend.busy(self._error)

    def _fail(self, error: Exception) -> None:
        self._error = error
        self.online = False
        self._last_try = time.monotonic()
        if self._busy() and not self._stalled():  # busy, not failing: retried, no word
            log.debug("Tracker: local store busy: %r", error)
            return
        if not self._warned:
            self._warned = True
            warnings.warn(redact(f"Tracker: {self.backend} failed ({type(error).__name__}: {error}); "
                                 f"training goes on, events are kept in {self.pending} and retried every "
                                 f"{self._retry_s:.0f} s (or: python -m trainer.tracking upload {self.run_dir})"),
                          RuntimeWarning, stacklevel=4)
        else:
            log.debug("Tracker: %s still failing: %r", self.dir.name, error)

    def _work(self) -> None:
        """The thread: connects, then delivers events in order until close() sends None."""
        try:
            # a local store busy with other runs is waited for (the run id is known before training starts)
            while not self._connect() and self.refused is None and self._busy() and not self._stalled():
                time.sleep(LOCAL_RETRY_INTERVAL_S / 4)
        finally:
            self._started.set()
        try:
            self._deliver_all()
        finally:
            try:
                self.backend.close()
            except Exception as e:
                log.debug("Tracker: %s did not close: %r", self.dir.name, e)

    def _deliver_all(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None:  # close(): a last try for what is pending, whatever the retry interval
                    if not self.online and not self._abandoned and self.pending.exists():
                        self._connect()
                    # a local store is busy (other runs writing the same SQLite file), not down: try again
                    # until it takes everything, as long as it answers (close() waits as long); a store that fails
                    # otherwise (not a database, a schema MLflow refuses) is not waited for
                    while not self._abandoned and self.pending.exists() and not self._stalled() and self._busy():
                        time.sleep(LOCAL_RETRY_INTERVAL_S / 4)
                        self._connect()
                    return
                if self._abandoned:  # close() gave up waiting: no more calls to the store
                    self._keep(event)
                else:
                    self._deliver(event)
            except Exception as e:  # the thread must live on: the event is kept, the error reported
                log.exception("Tracker: event %s could not be delivered nor kept: %r", event.get("op"), e)
            finally:
                self._queue.task_done()

    def _deliver(self, event: dict) -> None:
        if self.online or self._reconnect_due():
            try:
                assert self.run_id is not None  # online: _connect set it
                self.backend.apply(self.run_id, event, self.dir)
                self._progress = time.monotonic()
                return
            except Exception as e:
                self._fail(e)
        self._keep(event)

    def _keep(self, event: dict) -> None:
        """Append an event to the queue (a model object is saved under <queue>/model first, as data only:
        see store.save_offline_model)."""
        if event["op"] == "model_object":
            try:
                event = save_offline_model(event["model"], self.dir / OFFLINE_MODEL_DIR)
            except Exception as e:
                warnings.warn(f"Tracker.log_model: the model could not be kept offline: {e}", RuntimeWarning,
                              stacklevel=2)
                return
        with self._lock, self.pending.open("a") as f:
            f.write(json.dumps(event) + "\n")
