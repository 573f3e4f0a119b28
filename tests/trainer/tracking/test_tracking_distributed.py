"""Tracker.log_proxy_stats on 2 gloo ranks: rank 0 logs the proxy statistics of the whole criterion (local mode:
counts summed over ranks; sharded mode: every rank's block of counts and proxies), every rank resets."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import run_on_gloo_ranks
from tests.trainer.tracking.test_tracking import no_mlflow_env  # noqa: F401 (autouse fixture)
from trainer import tracking

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore::UserWarning")]
MODES = ("local", "sharded")


def _worker(rank: int, world: int, tmp: str) -> None:
    from loss.distributed import build_criterion
    from loss.proxy_stats import reduced_proxy_statistics
    from trainer.config import TrackingConfig
    from trainer.tracking import Tracker

    tracker = Tracker(TrackingConfig(enabled=True, experiment="dist"), Path(tmp) / "run", rank=rank,
                      config={"loss": {"proxies_per_class": 2}})
    for step, mode in enumerate(MODES, start=1):
        crit = build_criterion(mode, 6, 8, proxies_per_class=2)
        gen = torch.Generator().manual_seed(rank)
        x = torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=1)
        crit(x, torch.randint(0, 6, (12,), generator=gen))
        torch.save({"counts": crit.selection_counts.clone(), "proxies": crit.proxies.detach().clone()},
                   Path(tmp) / f"{mode}-rank{rank}.pt")
        tracker.log_proxy_stats(reduced_proxy_statistics(crit), step)
        crit.reset_selection_counts()
        assert int(crit.selection_counts.sum()) == 0
    assert (tracker.run_id is None) == (rank != 0)
    tracker.close()


def test_proxy_stats_gathered_over_ranks(tmp_path):
    run_on_gloo_ranks(_worker, 2, str(tmp_path))
    state = json.loads((tmp_path / "run" / "tracking" / "mlflow" / "state.json").read_text())
    client = mlflow.MlflowClient(state["tracking_uri"])
    history = {m.step: m.value for m in client.get_metric_history(state["run_id"], "proxy/never_selected_share")}
    for step, mode in enumerate(MODES, start=1):
        parts = [torch.load(tmp_path / f"{mode}-rank{r}.pt") for r in range(2)]
        if mode == "local":  # every rank holds all proxies, counts of its own samples
            counts = (parts[0]["counts"] + parts[1]["counts"]).numpy()
            proxies = parts[0]["proxies"].numpy()
        else:  # a block of classes per rank
            counts = torch.cat([p["counts"] for p in parts]).numpy()
            proxies = torch.cat([p["proxies"] for p in parts]).numpy()
        assert counts.shape == (12,) and counts.sum() > 0
        csv = tmp_path / "run" / "tracking" / "artifacts" / "proxies" / tracking.STEP_DIR.format(step)
        csv = csv / "proxy_selection.csv"
        table = pd.read_csv(csv)
        assert table["selection_count"].tolist() == counts.tolist(), mode
        assert np.allclose(table["norm"], np.linalg.norm(proxies, axis=1), atol=1e-6), mode
        assert history[step] == pytest.approx((counts == 0).mean()), mode
