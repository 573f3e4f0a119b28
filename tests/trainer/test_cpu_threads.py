"""A CPU rank started by a launcher that sets no thread count (DeepSpeed's sets LOCAL_SIZE, no OMP_NUM_THREADS)
shares the machine's cores with its local peers instead of taking them all."""
import os
import subprocess
import sys

import pytest

from tests.trainer.test_trainer_loop import ROOT, clean_env
from trainer.distributed import cpu_threads, free_port

CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.mark.parametrize("environ, want", [
    ({"LOCAL_SIZE": "2"}, max(1, CPUS // 2)),               # DeepSpeed's launcher
    ({"LOCAL_WORLD_SIZE": "4"}, max(1, CPUS // 4)),         # torchrun's variable
    ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, None),    # the user's choice stays
    ({"LOCAL_SIZE": "1"}, None),                            # one process: torch's own default
    ({}, None),
])
def test_cpu_threads(environ, want):
    assert cpu_threads(environ) == want


@pytest.mark.timeout(120)
def test_a_rank_of_deepspeeds_launcher_gets_its_share_of_the_cores():
    env = {k: v for k, v in clean_env().items() if k != "OMP_NUM_THREADS"}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    probe = ("import torch\nfrom trainer import distributed\nbefore = torch.get_num_threads()\n"
             "distributed.setup('cpu')\nprint(before, torch.get_num_threads())\ndistributed.teardown()")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(int, r.stdout.split())
    assert after == max(1, CPUS // 2), (before, after)
