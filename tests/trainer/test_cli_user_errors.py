"""A user's mistake at an entry point ends with one line naming it and exit status 2, never a traceback:
a device this machine lacks, data.decode=gpu without CUDA, and the tracking and DeepSpeed tools' missing folders;
and `--help` answers at once."""

import subprocess
import sys

import pytest
import torch

from tests.trainer.test_failure_paths import cli, no_tracking, one_error_line
from tests.trainer.test_trainer_loop import ROOT, clean_env, tiny

pytestmark = [pytest.mark.timeout(240),
              pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages on a machine without CUDA")]


@pytest.mark.parametrize("override, key", [("data.decode=gpu", "data.decode"), ("run.device=cuda", "run.device")])
def test_asking_for_a_gpu_this_machine_lacks_is_one_line_and_exit_2(shards, tmp_path, override, key):
    status, out, _ = cli(tiny(shards, tmp_path / "runs", override, *no_tracking()))
    assert status == 2, out[-3000:]
    assert key in one_error_line(out)
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists() or not any((tmp_path / "runs" / "t" /
                                                                             "checkpoints").iterdir())


def test_upload_of_a_folder_that_is_not_a_tracked_run_is_one_line_and_exit_2(tmp_path):
    status, out, _ = cli(["upload", str(tmp_path)], module="trainer.tracking")
    assert status == 2, out[-3000:]
    assert "not a tracked run directory" in one_error_line(out)


def test_deepspeed_export_of_a_missing_folder_is_one_line_and_exit_2(tmp_path):
    status, out, _ = cli(["export", str(tmp_path / "nope"), str(tmp_path / "out.pt")],
                         module="trainer.deepspeed_engine")
    assert status == 2, out[-3000:]
    assert "engine.name=deepspeed" in one_error_line(out)


def test_help_answers_without_importing_torch():
    """`python -m trainer --help` is the first thing a user types: it must not wait on torch (seconds under load)."""
    probe = ("import runpy, sys\nsys.argv = ['python -m trainer', '--help']\ntry:\n"
             "    runpy.run_module('trainer', run_name='__main__')\nexcept SystemExit as e:\n"
             "    code = e.code\nprint('EXIT', code, 'TORCH', 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                       timeout=60)
    assert "usage: python -m trainer" in r.stdout and "key=value" in r.stdout, r.stderr
    assert r.stdout.strip().endswith("EXIT 0 TORCH False"), r.stdout[-500:]


def test_a_missing_deepspeed_config_is_one_line_and_exit_2(capsys):
    """engine.deepspeed_config naming no file (or a file DeepSpeed cannot run here) is the user's to fix."""
    from trainer.engines.deepspeed_config import load_ds_config
    from trainer.errors import report

    with pytest.raises(Exception) as info:
        load_ds_config("no/such.json", per_rank_batch=8, world_size=1, grad_clip=0.0)
    assert report(info.value) == 2
    err = capsys.readouterr().err
    assert err == "error: engine.deepspeed_config: no such file 'no/such.json'\n", err
