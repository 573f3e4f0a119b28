"""pytorch-metric-learning losses behind ProxyGML's interface, on one process and gathered over 2 gloo ranks."""

import pytest
import torch
import torch.distributed as dist

from loss.baselines import MetricLoss
from tests.helpers import run_on_gloo_ranks

CASES = [
    ("NormalizedSoftmaxLoss", {}, None, True),
    ("ProxyNCALoss", {}, None, True),
    ("ProxyAnchorLoss", {"margin": 0.1, "alpha": 32}, None, True),
    ("SoftTripleLoss", {"centers_per_class": 2}, None, True),
    ("MultiSimilarityLoss", {}, "MultiSimilarityMiner", False),
    ("TripletMarginLoss", {"margin": 0.1}, "TripletMarginMiner", False),
]


@pytest.mark.parametrize("name,kwargs,miner,has_weights", CASES)
def test_builds_trains_and_exposes_weights(name, kwargs, miner, has_weights):
    torch.manual_seed(0)
    crit = MetricLoss(name, num_classes=5, dim=8, kwargs=kwargs, miner=miner)
    emb = torch.nn.functional.normalize(torch.randn(20, 8), dim=1).requires_grad_()
    labels = torch.arange(20) % 5
    loss = crit(emb, labels)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert bool(crit.proxy_parameters()) == has_weights
    assert set(crit.last_parts) == {"loss"}


@pytest.mark.parametrize(
    "args,key",
    [
        (dict(name="NoSuchLoss"), "loss.name"),
        (dict(name="ProxyAnchorLoss", kwargs={"nonsense": 1}), "loss.kwargs"),
        (dict(name="MultiSimilarityLoss", miner="NoSuchMiner"), "loss.miner"),
    ],
)
def test_bad_config_names_the_key(args, key):
    with pytest.raises(ValueError, match=key):
        MetricLoss(num_classes=4, dim=8, **args)


def test_bad_labels_raise():
    crit = MetricLoss("ProxyAnchorLoss", num_classes=4, dim=8)
    with pytest.raises(ValueError, match="labels"):
        crit(torch.randn(4, 8), torch.tensor([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="embeddings"):
        crit(torch.randn(4, 7), torch.tensor([0, 1, 2, 3]))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.arange(16) % 4


def _net():
    torch.manual_seed(3)
    return torch.nn.Linear(6, 8)


def _grads(name, miner, x, y):
    net = _net()
    crit = MetricLoss(name, num_classes=4, dim=8, miner=miner)
    torch.manual_seed(4)
    for p in crit.proxy_parameters():
        torch.nn.init.normal_(p)
    loss = crit(torch.nn.functional.normalize(net(x), dim=1), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in [*net.parameters(), *crit.proxy_parameters()]]


def _worker(rank, world, name, miner):
    x, y = _data()
    share = x.shape[0] // world
    net = _net()
    crit = MetricLoss(name, num_classes=4, dim=8, miner=miner, gather=True)
    torch.manual_seed(4)
    for p in crit.proxy_parameters():
        torch.nn.init.normal_(p)
    sl = slice(rank * share, (rank + 1) * share)
    loss = crit(torch.nn.functional.normalize(net(x[sl]), dim=1), y[sl])
    loss.backward()
    grads = [p.grad.clone() for p in [*net.parameters(), *crit.proxy_parameters()]]
    for g in grads:  # what DDP does: average over ranks
        dist.all_reduce(g)
        g /= world
    return loss.item(), grads


@pytest.mark.distributed
@pytest.mark.parametrize("name,miner", [  # one by default
    pytest.param("MultiSimilarityLoss", "MultiSimilarityMiner", marks=pytest.mark.slow), ("ProxyAnchorLoss", None)])
def test_gather_equals_one_process_on_global_batch(name, miner):
    loss, grads = run_on_gloo_ranks(_worker, 2, name, miner)[0]
    ref_loss, ref_grads = _grads(name, miner, *_data())
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
