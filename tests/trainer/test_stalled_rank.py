"""A rank that stops answering (SIGSTOP) ends the job within run.collective_timeout_s, with one line naming the rank
and what it was doing (issue 25, item 3): two real ranks under torchrun over gloo."""
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.trainer.test_trainer_loop import clean_env, tiny
from trainer.config import load_config

pytestmark = pytest.mark.timeout(300)


def test_the_collective_timeout_is_a_config_key_of_minutes():
    cfg = load_config("demo", [])
    assert 60 <= cfg.run.collective_timeout_s <= 900
    assert load_config("demo", ["run.collective_timeout_s=20"]).run.collective_timeout_s == 20


def rank_pid(launcher_pid, rank):
    """The pid of torchrun's worker of `rank` (a child of the launcher whose environment says RANK=rank)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


@pytest.mark.distributed
def test_a_stopped_rank_is_named_within_the_collective_timeout(shards, tmp_path):
    from trainer.distributed import free_port
    timeout_s = 10
    args = tiny(shards, tmp_path / "runs", "train.epochs=40", "eval.every_epochs=0",
                f"run.collective_timeout_s={timeout_s}")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "trainer", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=clean_env(),
                            start_new_session=True)
    out = []
    reader = threading.Thread(target=lambda: out.extend(iter(lambda: proc.stdout.read1(65536), b"")), daemon=True)
    reader.start()
    text = lambda: b"".join(out).decode(errors="replace")  # noqa: E731
    stopped = None
    try:
        deadline = time.monotonic() + 150
        while "img_s=" not in text():
            assert proc.poll() is None and time.monotonic() < deadline, text()[-3000:]
            time.sleep(0.1)
        stopped = rank_pid(proc.pid, 1)
        assert stopped, "rank 1's process not found"
        os.kill(stopped, signal.SIGSTOP)
        t = time.monotonic()
        while "stopped answering" not in text() and proc.poll() is None and time.monotonic() - t < 120:
            time.sleep(0.1)
        named_after = time.monotonic() - t
        code = proc.wait(timeout=120)
        ended_after = time.monotonic() - t
    finally:
        if stopped:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped, sig)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    reader.join(10)
    said = text()
    lines = [ln for ln in said.splitlines() if "stopped answering" in ln]
    print(f"named after {named_after:.1f} s, job ended after {ended_after:.1f} s, exit {code}")
    assert code != 0
    assert len(lines) == 1 and "rank 1" in lines[0] and "step" in lines[0] and "collective_timeout_s=10" in lines[0], \
        said[-3000:]
    assert named_after < timeout_s + 15, (named_after, said[-3000:])
    assert ended_after < timeout_s + 25, (ended_after, said[-3000:])  # not torchrun's 30 s wait on a frozen rank
    assert "Traceback" not in said.split("stopped answering")[0][-2000:]
