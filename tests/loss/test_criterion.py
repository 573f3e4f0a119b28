"""The Criterion contract (loss/criterion.py) on every loss form: ProxyGML, ReplicatedProxyGML (local, gather),
ShardedProxyGML and MetricLoss, each protocol method on one process; sharded rows, optimizer state and the DDP
engine through the contracts on 2 gloo ranks."""

import numpy as np
import pytest
import torch
from torch import nn

from loss import Criterion, ProxyGML, build_criterion
from loss.baselines import MetricLoss
from tests.helpers import run_on_gloo_ranks

C, N, DIM = 5, 2, 8

FORMS = {
    "proxygml": lambda: ProxyGML(C, DIM, proxies_per_class=N, r=0.3),
    "local": lambda: build_criterion("local", C, DIM, proxies_per_class=N, r=0.3),
    "gather": lambda: build_criterion("gather", C, DIM, proxies_per_class=N, r=0.3),
    "sharded": lambda: build_criterion("sharded", C, DIM, proxies_per_class=N, r=0.3),
    "metric_proxy": lambda: MetricLoss("ProxyAnchorLoss", C, DIM, {"margin": 0.1, "alpha": 32}),
    "metric_pairs": lambda: MetricLoss("MultiSimilarityLoss", C, DIM, miner="MultiSimilarityMiner"),
}
PROXYGML = ("proxygml", "local", "gather", "sharded")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, DIM, generator=g), torch.arange(12) % C


def stepped(crit):
    """crit after one Adam step on the embeddings and its proxy group (if any), and the optimizer."""
    emb, labels = batch()
    emb.requires_grad_()
    groups = [dict(params=[emb], name="embeddings"), dict(params=crit.proxy_parameters(), name="proxies")]
    opt = torch.optim.Adam([g for g in groups if g["params"]], lr=0.1)
    crit(emb, labels).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("form", FORMS)
def test_every_form_implements_the_contract(form):
    torch.manual_seed(0)
    crit = FORMS[form]()
    assert isinstance(crit, Criterion)
    assert crit.num_classes == C
    loss = crit(*batch())
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert crit.last_parts and all(v.ndim == 0 and not v.requires_grad for v in crit.last_parts.values())
    params = crit.proxy_parameters()
    assert all(isinstance(p, nn.Parameter) for p in params)
    if form in PROXYGML:
        assert params == [crit.proxies]
    named = dict(crit.named_parameters()) | dict(crit.named_buffers())
    assert set(crit.ddp_ignored_parameters()) <= set(named)
    assert crit.local_rows() == ((0, C * N, C * N) if form == "sharded" else None)


@pytest.mark.parametrize("form", FORMS)
def test_state_round_trips(form):
    torch.manual_seed(0)
    crit = FORMS[form]()
    opt = stepped(crit)
    full = crit.full_state_dict()
    torch.manual_seed(1)
    other = FORMS[form]()
    other.load_full_state_dict(full)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=0)
    torch.manual_seed(2)
    third = FORMS[form]()
    third.load_local_state_dict(full)  # one process: this rank's block is the whole table
    for k, v in third.state_dict().items():
        torch.testing.assert_close(v, full[k], rtol=0, atol=0)
    sd = opt.state_dict()
    to_full = crit.optimizer_state_to_full(sd)
    back = crit.optimizer_state_from_full(to_full)
    for state in (to_full, back):
        assert state["param_groups"] == sd["param_groups"]
        for i, st in sd["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(state["state"][i][k], v, rtol=0, atol=0)


@pytest.mark.parametrize("form", FORMS)
def test_selection_statistics_and_reset(form):
    torch.manual_seed(0)
    crit = FORMS[form]()
    crit(*batch())
    stats = crit.proxy_statistics()
    if form not in PROXYGML:
        assert stats is None  # no subgraphs
        crit.reset_selection_counts()
        return
    summary, per_proxy, per_class = stats
    assert summary["proxy/selections"] == 12 * crit.k
    assert len(per_proxy) == C * N and len(per_class) == C
    assert crit.proxy_statistics() is not None  # it does not reset
    crit.reset_selection_counts()
    assert crit.proxy_statistics() is None


def test_sharded_and_proxygml_share_the_constructor_checks():
    for make in (ProxyGML, lambda *a, **k: build_criterion("sharded", *a, **k)):
        with pytest.raises(ValueError, match="num_classes"):
            make(1, DIM)
        with pytest.raises(ValueError, match="scale"):
            make(C, DIM, scale=0.0)
        crit = make(C, DIM, proxies_per_class=N, r=0.3, lam=0.2)
        assert (crit.dim, crit.proxies_per_class, crit.k, crit.lam, crit.proxies.shape) == (DIM, N, 3, 0.2,
                                                                                             (C * N, DIM))


def _worker(rank, world):
    from types import SimpleNamespace

    from trainer.engines import Engine, TrainModule, build_engine

    torch.manual_seed(0)
    crit = build_criterion("sharded", C, DIM, proxies_per_class=N, r=0.3)
    module = TrainModule(nn.Linear(3, DIM), crit)
    opt = torch.optim.Adam([dict(params=module.embedder.parameters(), name="head"),
                            dict(params=crit.proxy_parameters(), name="proxies")], lr=0.1)
    env = SimpleNamespace(device=torch.device("cpu"), world_size=world, rank=rank)
    engine = build_engine("ddp", module, opt, env, grad_clip=1.0, find_unused_parameters=False,
                          deepspeed_config=None, per_rank_batch=4, amp_dtype=None, checkpoint_dir="", keep_last=1)
    g = torch.Generator().manual_seed(rank)
    loss = engine(torch.randn(4, 3, generator=g), torch.arange(4) % C)
    engine.backward(loss)
    engine.step()
    full = crit.optimizer_state_to_full(engine.optimizer_state_dict())
    pid = full["param_groups"][1]["params"][0]
    back = crit.optimizer_state_from_full(full)
    local = opt.state_dict()["state"][pid]
    table = crit.full_state_dict()
    crit.load_local_state_dict({"proxies": torch.zeros_like(crit.proxies)})
    zeroed = bool((crit.proxies == 0).all())
    crit.load_full_state_dict(table)
    return dict(engine=isinstance(engine, Engine), rows=crit.local_rows(), full=full["state"][pid]["exp_avg"].numpy(),
                local=local["exp_avg"].numpy(), table=table["proxies"].numpy(),
                proxies=crit.proxies.detach().numpy(), zeroed=zeroed,
                back=all(torch.equal(back["state"][pid][k], local[k]) for k in ("exp_avg", "exp_avg_sq")),
                ignored=sorted(getattr(module, "_ddp_params_and_buffers_to_ignore", [])))


@pytest.mark.distributed
def test_sharded_contract_on_two_ranks():
    res = run_on_gloo_ranks(_worker, 2)
    assert res[0]["rows"] == (0, 6, C * N) and res[1]["rows"] == (6, C * N, C * N)  # classes 0-2 | 3-4
    for r in range(2):
        start, stop, _ = res[r]["rows"]
        assert res[r]["engine"] and res[r]["back"] and res[r]["zeroed"]
        assert res[r]["ignored"] == ["criterion.proxies", "criterion.selection_counts"]
        assert res[r]["full"].shape == (C * N, DIM)
        np.testing.assert_array_equal(res[r]["full"][start:stop], res[r]["local"])
        np.testing.assert_array_equal(res[r]["table"][start:stop], res[r]["proxies"])
    np.testing.assert_array_equal(res[0]["full"], res[1]["full"])
