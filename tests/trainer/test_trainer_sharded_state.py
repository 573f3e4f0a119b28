"""Sharded proxies under the DDP engine: gradient clipping by the global norm, and the proxies' optimizer
state saved as the full table and cut back to each rank's block (2 gloo ranks, uneven class blocks)."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.helpers import run_on_gloo_ranks

C, DIM = 5, 4  # 5 classes over 2 ranks: blocks of 3 and 2


def _worker(rank, world):
    from loss.distributed import build_criterion, ddp_ignored_names
    from loss.row_sharded import map_group_rows
    from trainer.engines import TrainModule
    from trainer.engines.ddp import clip_grad_norm

    torch.manual_seed(0)
    embedder = nn.Linear(3, DIM)
    crit = build_criterion("sharded", C, DIM, r=0.6, lam=0.3)  # k = 3: a real subgraph
    module = TrainModule(embedder, crit)
    opt = torch.optim.Adam([dict(params=embedder.parameters(), name="backbone"),
                            dict(params=[crit.proxies], name="proxies")], lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.arange(8) % C
    sl = slice(rank * 4, rank * 4 + 4)
    module(x[sl], y[sl]).backward()
    for p in embedder.parameters():  # what DDP does for the replicated parameters
        dist.all_reduce(p.grad)
        p.grad /= world
    full_before = [p.grad.clone() for p in embedder.parameters()]
    own = crit.proxies.grad.clone()
    norm = clip_grad_norm(module, 1e-3, set(ddp_ignored_names(module, crit)))
    opt.step()
    sd = map_group_rows(opt.state_dict(), "proxies", crit.proxies.shape[0], crit.gather_rows)
    back = map_group_rows(sd, "proxies", C, crit.shard_rows)
    pid = opt.state_dict()["param_groups"][1]["params"][0]
    local = opt.state_dict()["state"][pid]["exp_avg"]
    blocks = [None] * world
    dist.all_gather_object(blocks, local.numpy())
    return dict(norm=norm.item(), proxy_grad=own.numpy(), rep=[g.numpy() for g in full_before],
                coef_rep=[((p.grad * g).sum() / (g * g).sum()).item() for p, g in
                          zip(embedder.parameters(), full_before)],
                full=sd["state"][pid]["exp_avg"].numpy(), blocks=blocks,
                back_equal=bool(torch.equal(back["state"][pid]["exp_avg"], local)))


@pytest.mark.distributed
def test_sharded_clip_and_optimizer_state_round_trip():
    res = dict(enumerate(run_on_gloo_ranks(_worker, 2)))
    import numpy as np

    # the global norm: replicated gradients once, every rank's proxy block once
    expected = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in res[0]["rep"])
                       + sum((res[r]["proxy_grad"].astype(np.float64) ** 2).sum() for r in res))
    for r in res:
        assert res[r]["norm"] == pytest.approx(expected, rel=1e-5)
        coef = res[r]["coef_rep"]
        assert all(c == pytest.approx(1e-3 / expected, rel=1e-3) for c in coef), (coef, 1e-3 / expected)
    # the saved table is the blocks end to end (3 + 2 rows), and cutting it back gives each rank its own
    full = res[0]["full"]
    assert full.shape == (C, DIM)
    np.testing.assert_array_equal(full, np.concatenate(res[0]["blocks"]))
    assert [b.shape[0] for b in res[0]["blocks"]] == [3, 2]
    assert res[0]["back_equal"] and res[1]["back_equal"]
