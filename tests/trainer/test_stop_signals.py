"""Ctrl-C and repeated stop signals (issue 25, item 7), on a real `python -m trainer` process with a loader worker
and a tracked run: Ctrl-C is a stop request like SIGTERM (checkpoint, a line saying how to resume, MLflow KILLED,
status 0); a second Ctrl-C stops at once (status 130, MLflow KILLED); a SIGTERM / SIGUSR1 repeated while the stop
is under way never turns the clean stop into death by signal. The checkpoint write is slowed (and announced) by a
sitecustomize hook so that the second signal lands inside it."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.trainer.test_trainer_loop import clean_env, tiny

pytestmark = pytest.mark.timeout(240)

HOOK = textwrap.dedent("""
    import os, sys, time
    if os.environ.get("SLOW_STOP_SAVE"):
        import trainer.train_state as T
        _save = T.TrainState.save
        def save(self, *a, **k):
            if k.get("stopping"):
                print("SAVING", file=sys.stderr, flush=True)
                time.sleep(float(os.environ["SLOW_STOP_SAVE"]))
            return _save(self, *a, **k)
        T.TrainState.save = save
""")


class Trainer:
    """`python -m trainer` in its own session (a terminal's process group), its output collected as it comes."""

    def __init__(self, args, tmp_path, slow_save=0.0):
        hook = tmp_path / "hook"
        hook.mkdir(exist_ok=True)
        (hook / "sitecustomize.py").write_text(HOOK)
        env = clean_env()
        env["PYTHONPATH"] = f"{hook}{os.pathsep}{env['PYTHONPATH']}"
        if slow_save:
            env["SLOW_STOP_SAVE"] = str(slow_save)
        self.env = env
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.out = b""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            self.out += chunk

    @property
    def text(self):
        return self.out.decode(errors="replace")

    def wait_for(self, word, timeout=120):
        deadline = time.monotonic() + timeout
        while word not in self.text:
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {word!r}: {self.text[-3000:]}"
            assert time.monotonic() < deadline, f"no {word!r} within {timeout} s: {self.text[-3000:]}"
            time.sleep(0.05)

    def signal_group(self, sig):
        os.killpg(self.proc.pid, sig)  # as a terminal's Ctrl-C: the trainer and its loader worker

    def finish(self, timeout=90):
        code = self.proc.wait(timeout=timeout)
        self._reader.join(10)
        return code, time.monotonic() - self.t0


def args_for(shards, out):
    return tiny(shards, out, "train.epochs=40", "data.num_workers=1", "tracking.enabled=true",
                "eval.every_epochs=0")


def mlflow_status(out):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [r.info.status for r in runs]


def test_ctrl_c_checkpoints_says_how_to_resume_and_marks_the_run_killed(shards, tmp_path):
    out = tmp_path / "runs"
    run = Trainer(args_for(shards, out), tmp_path)
    run.wait_for("img_s=")  # training
    t = time.monotonic()
    run.signal_group(signal.SIGINT)
    code, _ = run.finish()
    secs = time.monotonic() - t
    text = run.text
    assert code == 0 and secs < 30, (code, secs, text[-3000:])
    assert "Ctrl-C" in text and "checkpoint saved" in text and "run the same command again" in text, text[-3000:]
    assert "Traceback" not in text and "interrupted" not in text
    from trainer.checkpoint import Checkpointer, load
    saved = load(Checkpointer(str(out / "t" / "checkpoints")).latest())
    assert 0 < saved["step"] < 40 * 14 and f"(step {saved['step']})" in text
    assert mlflow_status(out) == ["KILLED"]
    again = Trainer(args_for(shards, out) + [f"train.max_steps={saved['step'] + 2}"], tmp_path)
    code, _ = again.finish()
    assert code == 0 and f"step {saved['step']}" in again.text and "resumed from" in again.text, again.text[-3000:]


def test_a_second_ctrl_c_stops_at_once(shards, tmp_path):
    out = tmp_path / "runs"
    run = Trainer(args_for(shards, out), tmp_path, slow_save=60)
    run.wait_for("img_s=")
    run.signal_group(signal.SIGINT)
    run.wait_for("SAVING")  # the first press is being handled: the stop's checkpoint is being written
    time.sleep(StopFlagSamePress() + 0.3)
    t = time.monotonic()
    run.signal_group(signal.SIGINT)
    code, _ = run.finish(timeout=60)
    secs = time.monotonic() - t
    assert code == 130 and secs < 20, (code, secs, run.text[-3000:])
    assert "interrupted" in run.text and "Traceback" not in run.text, run.text[-3000:]
    assert mlflow_status(out) == ["KILLED"]


def StopFlagSamePress():  # noqa: N802
    from trainer.loop import StopFlag
    return getattr(StopFlag, "SAME_PRESS_S", 0.0)


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])
def test_a_repeated_stop_signal_keeps_the_clean_stop(shards, tmp_path, sig):
    """The launcher signals again and again while the stop's checkpoint is written and the process winds down."""
    out = tmp_path / "runs"
    run = Trainer(args_for(shards, out), tmp_path, slow_save=2)
    run.wait_for("img_s=")
    run.signal_group(sig)
    run.wait_for("SAVING")
    deadline = time.monotonic() + 60
    while run.proc.poll() is None and time.monotonic() < deadline:
        try:
            os.kill(run.proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    code, _ = run.finish()
    assert code == 0, (code, run.text[-3000:])
    assert "checkpoint saved" in run.text and "Traceback" not in run.text
    assert mlflow_status(out) == ["KILLED"]
