"""bench/throughput.py at a tiny size on the CPU, so that it keeps running (its numbers are not checked)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import throughput  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def test_throughput_bench_runs_tiny(capsys):
    res = throughput.main(["--device", "cpu", "--backbone", "small_cnn", "--image-size", "32", "--resize-size",
                           "36", "--batch-size", "8", "--workers", "1", "--steps", "2", "--warmup", "1",
                           "--amp", "none", "--source-height", "48", "--source-width", "64", "--classes", "4"])
    assert res["device"] == "cpu" and res["num_samples"] == 8 * 3
    (row,) = res["rows"]
    assert row["workers"] == 1 and row["ceiling"] > 0 and row["cpu"] > 0 and row["device"] > 0
    # 3 batches of 8 JPEGs went through the batched decoder (warm-up + 2 timed, maybe one ahead)
    assert row["device_stats"]["device"] >= 24 and row["device_stats"]["unreadable"] == 0
    out = capsys.readouterr().out
    assert f"| 1 | {row['ceiling']:.1f} | {row['cpu']:.1f} | {row['cpu'] / row['ceiling']:.2f} |" in out


def test_throughput_bench_rejects_bad_workers():
    with pytest.raises(SystemExit):
        throughput.parse_args(["--workers", "1,four"])


@pytest.mark.slow  # the --trainer comparison (19 s); the plain throughput bench runs by default
def test_throughput_trainer_comparison_runs_tiny(capsys):
    """--trainer: the demo's Trainer.train_epoch, a plain loop on its loader and over tensors in memory."""
    res = throughput.main(["--trainer", "--rounds", "1", "--trainer-workers", "0"])
    assert set(res["rates"]) == {"trainer", "plain loop, same loader", "plain loop, tensors in memory"}
    assert all(len(r) == 1 and r[0] > 0 for r in res["rates"].values())
    out = capsys.readouterr().out
    assert "| plain loop, same loader |" in out and "load average" in out
