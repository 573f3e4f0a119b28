"""local / gather / sharded ProxyGML on gloo CPU ranks equal one process on the concatenated batch."""

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from collectives import block
from loss import ProxyGML
from loss.distributed import build_criterion, ddp_ignore
from tests.helpers import run_on_gloo_ranks

SWITCHES = list(itertools.product([True, False], repeat=3))  # pos_mask, class_mask, proxy_reg
# (C, N, dim, r): uneven class blocks (7 over 2 or 4 ranks), k >= N, k < N, k = C*N
SHAPES = [(7, 2, 8, 0.2), (9, 3, 6, 0.05), (7, 1, 5, 1.0), (13, 2, 8, 0.1)]
SIZES = {2: [3, 5], 4: [2, 3, 1, 4]}


def close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rel * scale + 1e-7, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def make_batch(seed: int, C: int, N: int, dim: int, total: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(total, dim, generator=g), torch.randint(0, C, (total,), generator=g),
            torch.randn(C * N, dim, generator=g))


def check_against_one_process(mode, rank, size, seed, shape, switches, lam=0.3):
    C, N, dim, r = shape
    pos_mask, class_mask, proxy_reg = switches
    kwargs = dict(proxies_per_class=N, r=r, lam=lam, pos_mask=pos_mask, class_mask=class_mask,
                  proxy_reg=proxy_reg)
    sizes = SIZES[size]
    x, labels, proxies = make_batch(seed, C, N, dim, sum(sizes))
    single = ProxyGML(C, dim, **kwargs)
    single.load_state_dict({"proxies": proxies})
    xs = x.clone().requires_grad_()
    want = single(xs, labels)
    want.backward()

    # sharded: short candidate lists (1.2 k / W: usually enough; 0.3 k / W: falls back to all)
    extra = {"candidate_factor": 0.3 if seed % 2 else 1.2} if mode == "sharded" else {}
    crit = build_criterion(mode, C, dim, **kwargs, **extra)
    crit.load_full_state_dict({"proxies": proxies})
    lo = sum(sizes[:rank])
    xr = x[lo:lo + sizes[rank]].clone().requires_grad_()
    got = crit(xr, labels[lo:lo + sizes[rank]])
    got.backward()
    tag = f"{mode} W={size} {shape} {switches}"
    close(got.detach(), want.detach(), f"loss {tag}")
    for part in ("loss_s", "loss_p"):
        close(crit.last_parts[part], single.last_parts[part], f"{part} {tag}")
    close(xr.grad / size, xs.grad[lo:lo + sizes[rank]], f"embedding grad {tag}")  # DDP divides by W
    if mode == "sharded":
        close(crit.proxies.grad, single.proxies.grad[crit.proxy_start:crit.proxy_stop], f"proxy grad {tag}")
    else:
        averaged = crit.proxies.grad.clone()
        dist.all_reduce(averaged)
        close(averaged / size, single.proxies.grad, f"proxy grad {tag}")
    assert torch.equal(crit.global_selection_counts(), single.selection_counts), f"counts {tag}"
    assert torch.equal(crit.full_state_dict()["proxies"], proxies)


class Net(nn.Module):
    def __init__(self, criterion, dim_in=6, dim=8):
        super().__init__()
        self.embed = nn.Linear(dim_in, dim)
        self.criterion = criterion

    def forward(self, inputs, labels):
        return self.criterion(self.embed(inputs), labels)


def check_optimizer_steps(mode, rank, size, steps=3):
    """DDP over (embedder, criterion) for a few SGD steps stays equal to one process."""
    C, dim, kwargs = 7, 8, dict(proxies_per_class=2, r=0.2, lam=0.3)
    sizes = SIZES[size]
    torch.manual_seed(0)
    single = Net(ProxyGML(C, dim, **kwargs))
    net = Net(build_criterion(mode, C, dim, **kwargs))
    net.embed.load_state_dict(single.embed.state_dict())
    net.criterion.load_full_state_dict(single.criterion.state_dict())
    ignored = ddp_ignore(net, net.criterion)
    assert "criterion.selection_counts" in ignored
    model = DistributedDataParallel(net)
    opt_single = torch.optim.SGD(single.parameters(), lr=0.5, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    lo = sum(sizes[:rank])
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        inputs, labels = torch.randn(sum(sizes), 6, generator=g), torch.randint(0, C, (sum(sizes),), generator=g)
        opt_single.zero_grad()
        single(inputs, labels).backward()
        opt_single.step()
        opt.zero_grad()
        model(inputs[lo:lo + sizes[rank]], labels[lo:lo + sizes[rank]]).backward()
        opt.step()
    close(net.embed.weight.detach(), single.embed.weight.detach(), f"{mode} embedder after {steps} steps")
    close(net.criterion.full_state_dict()["proxies"], single.criterion.proxies.detach(),
          f"{mode} proxies after {steps} steps")


def check_tie_break(rank, size):
    """Exact ties: sharded selection takes the lower global proxy index, like a stable sort."""
    C, N, dim = 10, 2, 4
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 2, (6, dim), generator=g).float() * 2 - 1  # similarities are exact multiples of 1/2
    proxies = torch.randint(0, 2, (C * N, dim), generator=g).float() * 2 - 1
    labels = torch.randint(0, C, (6,), generator=g)
    for (pos_mask, r), factor in itertools.product([(True, 0.3), (False, 0.3), (False, 0.05), (True, 0.5)],
                                                   [2.0, 1.2, 0.3]):
        crit = build_criterion("sharded", C, dim, proxies_per_class=N, r=r, pos_mask=pos_mask,
                               candidate_factor=factor)
        crit.load_full_state_dict({"proxies": proxies})
        crit(x[rank::size], labels[rank::size])
        order = torch.cat([x[i::size] for i in range(size)])
        ordered_labels = torch.cat([labels[i::size] for i in range(size)])
        sim = F.normalize(order, dim=1) @ F.normalize(proxies, dim=1).t()
        own = (torch.arange(C * N)[None] // N == ordered_labels[:, None]).float()
        scores = sim + 4 * own if pos_mask else sim
        chosen = scores.sort(dim=1, descending=True, stable=True).indices[:, :crit.k]
        want = torch.bincount(chosen.flatten(), minlength=C * N)
        assert torch.equal(crit.global_selection_counts(), want), (pos_mask, r)


def check_resharding(rank, size):
    """A sharded checkpoint loads on another world size and into ProxyGML."""
    C, N, dim = 7, 2, 8
    crit = build_criterion("sharded", C, dim, proxies_per_class=N, seed=3)
    full = crit.full_state_dict()
    alone = dist.new_group([0])  # every rank must take part in creating it
    if rank == 0:  # world size 1 draws the same initial proxies and holds them all
        one = build_criterion("sharded", C, dim, proxies_per_class=N, seed=3, group=alone)
        assert torch.equal(one.full_state_dict()["proxies"], full["proxies"])
    plain = ProxyGML(C, dim, N)
    plain.load_state_dict(full)
    reloaded = build_criterion("sharded", C, dim, proxies_per_class=N)
    reloaded.load_full_state_dict(plain.state_dict())
    assert torch.equal(reloaded.proxies, full["proxies"][reloaded.proxy_start:reloaded.proxy_stop])
    start, stop = block(C, size, rank)
    assert (reloaded.class_start, reloaded.class_stop) == (start, stop)
    with pytest.raises(ValueError, match="proxies"):
        reloaded.load_full_state_dict({"proxies": full["proxies"][:-1]})


def worker(rank, size, mode, shapes, switches, extras):
    for seed, (shape, sw) in enumerate(itertools.product(shapes, switches)):
        check_against_one_process(mode, rank, size, seed, shape, sw)
    check_against_one_process(mode, rank, size, 99, SHAPES[0], SWITCHES[0], lam=0.0)
    if "steps" in extras:
        check_optimizer_steps(mode, rank, size)
    if "ties" in extras:
        check_tie_break(rank, size)
    if "reshard" in extras:
        check_resharding(rank, size)


def spawn(size, mode, shapes, switches, extras=()):
    run_on_gloo_ranks(worker, size, mode, shapes, switches, extras, timeout=840)


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["local", "gather", "sharded"])
def test_two_ranks(mode):
    extras = ("steps", "ties", "reshard") if mode == "sharded" else ("steps",)
    spawn(2, mode, SHAPES[:3], SWITCHES[::3], extras)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["local", "gather", "sharded"])
def test_four_ranks(mode):
    extras = ("steps", "ties", "reshard") if mode == "sharded" else ("steps",)
    spawn(4, mode, SHAPES, SWITCHES, extras)


def test_build_criterion_single_process_is_proxygml():
    x, labels, proxies = make_batch(0, 7, 2, 8, 10)
    single = ProxyGML(7, 8, 2, r=0.2)
    single.load_state_dict({"proxies": proxies})
    want = single(x, labels)
    for mode in ("local", "gather", "sharded"):
        crit = build_criterion(mode, 7, 8, proxies_per_class=2, r=0.2)
        crit.load_full_state_dict({"proxies": proxies})
        assert crit(x, labels).item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ValueError, match="mode"):
        build_criterion("ring", 7, 8)


def test_bad_arguments_raise():
    crit = build_criterion("sharded", 7, 8)
    with pytest.raises(ValueError, match="criterion"):
        ddp_ignore(nn.Linear(2, 2), crit)
    with pytest.raises(ValueError, match="candidate_factor"):
        build_criterion("sharded", 7, 8, candidate_factor=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_criterion("gather", 1, 8)
    with pytest.raises(ValueError, match="proxies"):
        crit.load_full_state_dict({"weights": torch.zeros(7, 8)})
    assert crit.ddp_ignored_parameters() == ["proxies", "selection_counts"]
    assert build_criterion("local", 7, 8).ddp_ignored_parameters() == ["selection_counts"]
