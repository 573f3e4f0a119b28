"""The tracker's sender thread: every MLflow call of a run, in order, off the training thread. A failing,
unreachable or hung store never stops nor stalls training: the first failure warns once, later events are
appended to `<run_dir>/tracking/pending.jsonl`, the store is retried every RETRY_INTERVAL_S and, once it answers,
gets what is pending. A local store (SQLite file, folder) has no network to wait for: it is only ever busy (other runs
writing the same file), so its waits are driven by progress, not by a clock: the start waits for the run to be
created and close() for every event to be delivered, as long as the store answers something within LOCAL_STALL_S;
meanwhile a busy answer is retried every LOCAL_RETRY_INTERVAL_S without a warning. The run's id, store and recall
history are kept in `<run_dir>/tracking/state.json` (read by resume and by upload)."""
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
from trainer.tracking.store import OFFLINE_MODEL_DIR, Store, is_local_store, save_offline_model

log = logging.getLogger("trainer.tracking")

TRACKING_DIR = "tracking"  # under the run directory: state.json, pending.jsonl, artifacts/, model/
RETRY_INTERVAL_S = 60.0  # while offline, ask the server again at most this often
LOCAL_RETRY_INTERVAL_S = 2.0  # the same for a local store (SQLite file): busy for a moment, not down
START_WAIT_S = 30.0  # Tracker() waits at most this long for a server's first answer (run id)
CLOSE_WAIT_S = 30.0  # close() waits at most this long for the sender thread to deliver what is queued to a server
LOCAL_STALL_S = 300.0  # a local store that stays busy (or hung) this long without a single answer is given up


def store_busy(error: BaseException) -> bool:
    """Whether an error is a local store being busy (SQLite `database is locked`, the store-creation lock file
    held by another process): a reason to retry, not a failure."""
    from filelock import Timeout

    return isinstance(error, Timeout) or "database is locked" in str(error) or "database is busy" in str(error)


def login_refused(error: Exception) -> bool:
    """Whether an MLflow error is the server refusing this client's credentials (HTTP 401, or 403 at start)."""
    code = getattr(error, "error_code", "")
    return code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or " 401 != 200" in str(error)


def read_state(tracking_dir: Path) -> dict:
    """The run's state.json ({} when there is none yet)."""
    path = tracking_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


class Sender:
    """Delivers a run's events to one store from a daemon thread; keeps them in pending.jsonl while it fails.

    run_id: continue that MLflow run (else the one of state.json when events are still pending there, else a
    new run). Waits at most START_WAIT_S for the store's first answer."""

    def __init__(self, run_dir: Path, uri: str, experiment: str, run_name: str, run_id: str | None,
                 artifact_root: str | None):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / TRACKING_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pending = self.dir / "pending.jsonl"
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        state = read_state(self.dir)
        self.run_id = run_id or (state.get("run_id") if self.pending.exists() else None)
        self.experiment_id: str | None = None
        self.eval_history: list[tuple[int, dict[int, float]]] = []
        if self.run_id and state.get("run_id") == self.run_id:  # same run: the recall curve goes on
            self.eval_history = [(int(s), {int(k): v for k, v in r.items()}) for s, r in state.get("eval_history", [])]
        self._artifact_root = artifact_root
        self.store: Store | None = None
        self.online = False
        self.refused: Exception | None = None  # the server refused the login at the first connection
        self._warned = False
        self._abandoned = False
        self._last_try = -math.inf
        self._error: Exception | None = None  # the store's last error
        self._local = is_local_store(uri)
        self._lock = threading.Lock()  # pending.jsonl and state.json are written by both threads
        self.write_state(artifact_root)
        self._queue: queue.Queue = queue.Queue()
        self._started = threading.Event()
        self._progress = time.monotonic()  # the last answer of the store (a call that returned)
        self._worker = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
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
            warnings.warn(f"Tracker: MLflow at {redact(self.uri)} did not answer {waited}; the "
                          "events not sent yet are kept locally", RuntimeWarning, stacklevel=3)
            while True:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    break
                if event is not None:
                    self._keep(event)
        if self.pending.exists():
            where = "the local store did not take them" if self._local else "tracking server unreachable"
            warnings.warn(redact(f"Tracker: {where} ({self.uri}), events kept in {self.pending}; upload them "
                                 f"with: python -m trainer.tracking upload {self.run_dir}"), RuntimeWarning,
                          stacklevel=3)

    def abort(self) -> None:
        """End the thread without another call to the store (after a refused login)."""
        self._abandoned = True
        self._queue.put(None)

    def write_state(self, artifact_root: str | None = None) -> None:
        with self._lock:
            state = read_state(self.dir)
            state.update({"tracking_uri": redact(self.uri), "experiment": self.experiment, "run_name": self.run_name,
                          "run_id": self.run_id, "eval_history": self.eval_history})
            if artifact_root is not None:
                state["artifact_root"] = artifact_root
            tmp = self.dir / "state.json.tmp"
            tmp.write_text(json.dumps(state, indent=1))
            tmp.replace(self.dir / "state.json")

    # -- the thread

    def _connect(self) -> bool:
        self._last_try = time.monotonic()
        try:
            if self.store is None:  # creating the client already touches a SQLite store
                self.store = Store(self.uri, self._artifact_root)
            self.run_id = self.store.ensure_run(self.experiment, self.run_name, self.run_id)
            self.experiment_id = self.store.experiment_id
            self.write_state()
            self._progress = time.monotonic()
            self.store.replay(self.run_id, self.pending)
        except Exception as e:
            if not self._started.is_set() and login_refused(e):  # at start: the Tracker says it, no training
                self.refused = e
                return False
            self._fail(e)
            return False
        if not self.online and self._warned:
            log.warning("Tracker: tracking server %s reachable again; pending events uploaded", redact(self.uri))
        self.online = True
        return True

    @property
    def _retry_s(self) -> float:
        return LOCAL_RETRY_INTERVAL_S if self._local else RETRY_INTERVAL_S

    def _reconnect_due(self) -> bool:
        if time.monotonic() - self._last_try < self._retry_s:
            return False
        return self._connect()

    def _fail(self, error: Exception) -> None:
        self._error = error
        self.online = False
        self._last_try = time.monotonic()
        if self._local and store_busy(error) and not self._stalled():  # busy, not failing: retried, no word
            log.debug("Tracker: local store busy: %r", error)
            return
        if not self._warned:
            self._warned = True
            warnings.warn(redact(f"Tracker: MLflow at {self.uri} failed ({type(error).__name__}: {error}); "
                                 f"training goes on, events are kept in {self.pending} and retried every "
                                 f"{self._retry_s:.0f} s (or: python -m trainer.tracking upload {self.run_dir})"),
                          RuntimeWarning, stacklevel=4)
        else:
            log.debug("Tracker: MLflow still failing: %r", error)

    def _work(self) -> None:
        """The thread: connects, then delivers events in order until close() sends None."""
        try:
            # a local store busy with other runs is waited for (the run id is known before training starts)
            while (not self._connect() and self._local and self.refused is None and store_busy(self._error)
                   and not self._stalled()):
                time.sleep(LOCAL_RETRY_INTERVAL_S / 4)
        finally:
            self._started.set()
        while True:
            event = self._queue.get()
            try:
                if event is None:  # close(): a last try for what is pending, whatever the retry interval
                    if not self.online and not self._abandoned and self.pending.exists():
                        self._connect()
                    # a local store is busy (other runs writing the same SQLite file), not down: try again
                    # until it takes everything, as long as it answers (close() waits as long); a store that fails
                    # otherwise (not a database, a schema MLflow refuses) is not waited for
                    while (self._local and not self._abandoned and self.pending.exists() and not self._stalled()
                           and store_busy(self._error)):
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
                if event["op"] == "model_object":
                    self.store.log_model(self.run_id, event["model"])
                else:
                    self.store.apply(self.run_id, event)
                self._progress = time.monotonic()
                return
            except Exception as e:
                self._fail(e)
        self._keep(event)

    def _keep(self, event: dict) -> None:
        """Append an event to pending.jsonl (a model object is saved under tracking/model first, as data only:
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
