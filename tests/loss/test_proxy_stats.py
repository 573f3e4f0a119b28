"""Proxy statistics reduced from per-rank blocks (loss/proxy_stats.py) equal the ones of the full table
(tests/loss/proxy_stats_reference.py: float64 numpy from the definitions), and a sharded criterion never gathers
its proxy table for them."""

import numpy as np
import pytest
import torch

from loss.proxy_stats import gini_from_histogram, reduced_proxy_statistics
from tests.helpers import run_on_gloo_ranks
from tests.loss import proxy_stats_reference as reference


def _same(got, want):
    (s1, p1, c1), (s2, p2, c2) = got, want
    assert s1.keys() == s2.keys()
    for k in s1:  # counts exactly (up to float64 sums); spread and norm from float32 proxies, in another order
        tol = 1e-6 if k in ("proxy/class_spread_mean", "proxy/norm_mean") else 1e-9
        assert s1[k] == pytest.approx(s2[k], rel=tol, abs=1e-12), k
    assert p1["selection_count"].tolist() == p2["selection_count"].tolist()
    assert p1["class"].tolist() == p2["class"].tolist()
    np.testing.assert_allclose(p1["norm"], p2["norm"], rtol=1e-6)
    assert c1["selection_count"].tolist() == c2["selection_count"].tolist()
    assert c1["proxies_selected"].tolist() == c2["proxies_selected"].tolist()
    np.testing.assert_allclose(c1["spread"], c2["spread"], rtol=1e-5, atol=1e-6)


def test_gini_from_histogram_is_the_gini_of_the_list():
    rng = np.random.default_rng(0)
    for counts in (rng.integers(0, 50, 1000), np.zeros(5, int), np.array([0] * 9 + [5]), rng.poisson(0.3, 777)):
        values, freq = np.unique(counts, return_counts=True)
        assert gini_from_histogram(values, freq) == pytest.approx(reference.gini(counts), rel=1e-12, abs=1e-15)


def test_one_process_matches_the_full_table_statistics():
    from loss import ProxyGML
    torch.manual_seed(0)
    crit = ProxyGML(6, 8, proxies_per_class=3)
    crit(torch.nn.functional.normalize(torch.randn(16, 8), dim=1), torch.randint(0, 6, (16,)))
    want = reference.proxy_statistics(crit.selection_counts.numpy(), crit.proxies.detach().numpy(), 3)
    _same(reduced_proxy_statistics(crit), want)
    crit.reset_selection_counts()
    assert reduced_proxy_statistics(crit) is None  # nothing selected since the reset


def _worker(rank, world):
    from loss.distributed import build_criterion
    crit = build_criterion("sharded", 5, 8, proxies_per_class=2, r=0.4)  # blocks of 3 and 2 classes
    gen = torch.Generator().manual_seed(rank)
    crit(torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=1),
         torch.randint(0, 5, (12,), generator=gen))
    counts, proxies = crit.gather_rows(crit.selection_counts), crit.gather_rows(crit.proxies)  # reference only

    def refuse(*a, **k):
        raise AssertionError("the proxy table was gathered")
    crit.gather_rows = refuse
    got = reduced_proxy_statistics(crit)
    return dict(got=got, want=reference.proxy_statistics(counts.numpy(), proxies.numpy(), 2))


@pytest.mark.distributed
def test_two_sharded_ranks_reduce_to_the_full_table_statistics():
    res = dict(enumerate(run_on_gloo_ranks(_worker, 2)))
    for r in res:
        _same(res[r]["got"], res[r]["want"])
    assert res[0]["got"][0]["proxy/selections"] > 0


def test_proxy_statistics_values():
    counts = np.array([0, 4, 0, 0, 2, 2])  # 3 classes x 2 proxies
    proxies = np.array([[1, 0], [1, 0], [1, 0], [-1, 0], [0, 1], [0, 2]], dtype=float)
    summary, per_proxy, per_class = reference.proxy_statistics(counts, proxies, 2)
    assert summary["proxy/never_selected_share"] == pytest.approx(0.5)
    assert summary["proxy/class_never_selected_share"] == pytest.approx(1 / 3)
    assert per_class["spread"].tolist() == pytest.approx([0.0, 2.0, 0.0])  # same / opposite / same direction
    assert summary["proxy/class_spread_mean"] == pytest.approx(2 / 3)
    assert per_class["selection_count"].tolist() == [4, 0, 4]
    assert reference.gini(np.ones(10)) == pytest.approx(0.0)
    assert reference.gini(np.array([0] * 9 + [5])) == pytest.approx(0.9)
    assert reference.proxy_statistics(np.ones(4), np.eye(4), 1)[0]["proxy/selection_entropy"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="proxies_per_class"):
        reference.proxy_statistics(np.ones(5), np.eye(5), 2)
