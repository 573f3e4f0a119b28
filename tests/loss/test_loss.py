"""ProxyGML against an independent dense reference written literally from the formulas (issue 2)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from loss import ProxyGML
from loss.proxygml import NO_EDGE_LOSS, proxy_cross_entropy_sum

SWITCHES = list(itertools.product([True, False], repeat=3))  # pos_mask, class_mask, proxy_reg


def reference(x, proxies, labels, C, N, r, lam, pos_mask, class_mask, proxy_reg):
    """The dense formulation: dense W (M x CN), dense Y^p (CN x C), dense proxy-proxy matrix (CN x CN)."""
    xh = x / x.norm(dim=1, keepdim=True)
    ph = proxies / proxies.norm(dim=1, keepdim=True)
    S = xh @ ph.t()
    Yp = F.one_hot(torch.arange(C * N) // N, C).to(S.dtype)
    pos = F.one_hot(labels, C).to(S.dtype) @ Yp.t()  # 1 on the sample's own class's proxies
    k = math.ceil(r * C * N)
    scores = S + 1000 * pos if pos_mask else S
    chosen = torch.zeros_like(S).scatter(1, scores.detach().topk(k, dim=1).indices, 1.0)
    W = chosen * S
    Z = W @ Yp
    Mask = (Z != 0).to(S.dtype) if class_mask else torch.ones_like(Z)
    E = torch.exp(Z) * Mask
    P = E / E.sum(dim=1, keepdim=True)
    p_own = P[torch.arange(len(labels)), labels]
    ls = torch.where(p_own > 0, -torch.log(torch.where(p_own > 0, p_own, 1.0)),
                     torch.full_like(p_own, -math.log(1e-20)))
    loss_s = ls.mean()
    if not (proxy_reg and lam > 0):
        return loss_s, loss_s, torch.zeros(()), chosen
    logits = (ph @ ph.t()) @ Yp
    loss_p = F.cross_entropy(logits, torch.arange(C * N) // N)
    return loss_s + lam * loss_p, loss_s, loss_p, chosen


def make_case(seed, C, N, dim, M, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, dim, generator=g, dtype=dtype)
    proxies = torch.randn(C * N, dim, generator=g, dtype=dtype)
    labels = torch.randint(0, C, (M,), generator=g)
    return x, proxies, labels


def run_both(x, proxies, labels, C, N, r, lam, switches):
    pos_mask, class_mask, proxy_reg = switches
    crit = ProxyGML(C, x.shape[1], N, r=r, lam=lam, pos_mask=pos_mask, class_mask=class_mask,
                    proxy_reg=proxy_reg).to(x.dtype)
    with torch.no_grad():
        crit.proxies.copy_(proxies)
    xa = x.clone().requires_grad_()
    loss = crit(xa, labels)
    loss.backward()
    xr = x.double().clone().requires_grad_()
    pr = proxies.double().clone().requires_grad_()
    ref, ref_s, ref_p, chosen = reference(xr, pr, labels, C, N, r, lam, *switches)
    ref.backward()
    return (loss, xa.grad, crit.proxies.grad, crit), (ref, xr.grad, pr.grad, ref_s, ref_p, chosen)


# (seed, C, N, dim, M, r): N = 1 and N > 1, k = 1, k = C*N, k < N and k = N
SIZES = [(0, 7, 1, 5, 9, 0.3), (1, 5, 3, 6, 8, 0.25), (2, 9, 2, 4, 7, 1 / 18), (3, 4, 3, 3, 6, 1.0),
         (4, 6, 4, 5, 5, 2 / 24), (5, 6, 4, 5, 5, 4 / 24), (6, 23, 2, 16, 30, 0.05)]


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("size", SIZES)
def test_matches_reference_float64(size, switches):
    seed, C, N, dim, M, r = size
    x, proxies, labels = make_case(seed, C, N, dim, M, torch.float64)
    (loss, gx, gp, crit), (ref, rgx, rgp, ref_s, ref_p, chosen) = run_both(x, proxies, labels, C, N, r, 0.3,
                                                                          switches)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gx, rgx, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gp, rgp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(crit.last_parts["loss_s"], ref_s, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(crit.last_parts["loss_p"], ref_p.to(ref_s.dtype), rtol=1e-10, atol=1e-10)
    assert torch.equal(crit.selection_counts, chosen.sum(dim=0).long())


@pytest.mark.parametrize("switches", SWITCHES)
@pytest.mark.parametrize("seed", range(3))
def test_matches_reference_float32_random_sizes(seed, switches):
    g = torch.Generator().manual_seed(100 + seed)
    C, N = int(torch.randint(2, 40, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    dim, M = int(torch.randint(2, 33, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
    r = float(torch.rand((), generator=g).clamp_min(0.01))
    x, proxies, labels = make_case(seed, C, N, dim, M, torch.float32)
    (loss, gx, gp, _), (ref, rgx, rgp, *_) = run_both(x, proxies, labels, C, N, r, 0.3, switches)
    scale = lambda t: t.abs().max().item() + 1e-12  # noqa: E731
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert (gx.double() - rgx).abs().max() <= 1e-5 * scale(rgx)
    assert (gp.double() - rgp).abs().max() <= 1e-5 * scale(rgp)


def test_lam_zero_and_no_edge_constant():
    """Without pos_mask a sample whose class gets no edge adds -log(1e-20) and no gradient."""
    C, N, dim = 6, 1, 4
    proxies = torch.eye(C, dim, dtype=torch.float64)[:, :dim]
    proxies[4:] = torch.tensor([[0.5, 0.5, 0.5, 0.5], [-0.5, 0.5, -0.5, 0.5]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.1, 0.0, 0.0], [0.0, 1.0, 0.05, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 3])  # sample 1 (class 3) is far from proxy 3 with k = 1
    crit = ProxyGML(C, dim, N, r=1 / 6, lam=0.0, pos_mask=False).double()
    with torch.no_grad():
        crit.proxies.copy_(proxies)
    xa = x.clone().requires_grad_()
    loss = crit(xa, labels)
    loss.backward()
    assert crit.last_parts["loss_p"].item() == 0.0
    assert loss.item() == pytest.approx((0.0 + NO_EDGE_LOSS) / 2)  # sample 0: its only class, P = 1
    assert torch.all(xa.grad[1] == 0)
    ref, *_ = reference(x, proxies, labels, C, N, 1 / 6, 0.0, False, True, True)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)


def test_gradcheck_tiny():
    for switches, (C, N, dim, M, r) in zip(SWITCHES, itertools.cycle([(4, 2, 3, 3, 0.4), (3, 1, 4, 4, 0.67)])):
        x, proxies, labels = make_case(7, C, N, dim, M, torch.float64)
        crit = ProxyGML(C, dim, N, r=r, lam=0.3, pos_mask=switches[0], class_mask=switches[1],
                        proxy_reg=switches[2], validate=False).double()

        def f(xx, pp, crit=crit, labels=labels):
            return torch.func.functional_call(crit, {"proxies": pp}, (xx, labels))

        assert torch.autograd.gradcheck(f, (x.requires_grad_(), proxies.requires_grad_()), atol=1e-7)


@pytest.mark.parametrize("chunk_elements", [1, 7, 10 ** 9])
def test_proxy_cross_entropy_chunks_and_gradcheck(chunk_elements):
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    sums = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 5, (7,), generator=g)
    got = proxy_cross_entropy_sum(rows, sums, targets, chunk_elements)
    want = F.cross_entropy(rows @ sums.t(), targets, reduction="sum")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: proxy_cross_entropy_sum(a, b, targets, chunk_elements),
                                    (rows, sums))


def test_chunked_regulariser_equals_unchunked():
    x, proxies, labels = make_case(11, 13, 3, 8, 10, torch.float32)
    out = []
    for chunk in (10 ** 9, 20):
        crit = ProxyGML(13, 8, 3, r=0.2, chunk_elements=chunk)
        with torch.no_grad():
            crit.proxies.copy_(proxies)
        xa = x.clone().requires_grad_()
        loss = crit(xa, labels)
        loss.backward()
        out.append((loss, xa.grad, crit.proxies.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_selection_counts_and_reset():
    C, N, M = 10, 2, 12
    x, proxies, labels = make_case(5, C, N, 6, M, torch.float32)
    crit = ProxyGML(C, 6, N, r=0.25)
    crit(x, labels)
    crit(x, labels)
    assert crit.selection_counts.dtype == torch.int64 and crit.selection_counts.shape == (C * N,)
    assert crit.selection_counts.sum().item() == 2 * M * crit.k
    own = crit.selection_counts.view(C, N)[labels.unique()]
    assert torch.all(own >= 2)  # with pos_mask every own proxy is chosen (k = 5 >= N)
    assert "selection_counts" not in crit.state_dict()
    crit.reset_selection_counts()
    assert crit.selection_counts.sum().item() == 0


def test_default_init_is_the_authors():
    crit = ProxyGML(50, 16, 2)
    bound = 1 / math.sqrt(100)  # kaiming-uniform(a=sqrt(5)) of a (dim, C*N) matrix
    assert crit.proxies.shape == (100, 16)
    assert crit.proxies.abs().max() <= bound and crit.proxies.abs().max() > 0.9 * bound


def test_autocast_keeps_fp32_and_stays_close():
    x, proxies, labels = make_case(9, 20, 2, 16, 24, torch.float32)
    crit = ProxyGML(20, 16, 2, r=0.1)
    with torch.no_grad():
        crit.proxies.copy_(proxies)
    exact = crit(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = crit(x.bfloat16(), labels)
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(exact.item(), rel=2e-2)
    mixed.backward()
    assert crit.proxies.grad.dtype == torch.float32 and torch.isfinite(crit.proxies.grad).all()


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"num_classes": 1}, "num_classes"), ({"num_classes": 2.5}, "num_classes"), ({"dim": 0}, "dim"),
    ({"proxies_per_class": 0}, "proxies_per_class"), ({"r": 0.0}, "r"), ({"r": 1.5}, "r"),
    ({"r": float("nan")}, "r"), ({"lam": -0.1}, "lam"), ({"lam": float("nan")}, "lam"),
])
def test_bad_config_raises(kwargs, name):
    args = {"num_classes": 5, "dim": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        ProxyGML(**args)


@pytest.mark.parametrize(("x", "y", "name"), [
    (torch.randn(3, 5), torch.tensor([0, 1, 2]), "embeddings"),          # wrong dim
    (torch.randn(3), torch.tensor([0, 1, 2]), "embeddings"),             # 1-D
    (torch.randint(0, 3, (3, 4)), torch.tensor([0, 1, 2]), "embeddings"),  # integer embeddings
    (torch.tensor([[0.0, float("nan"), 0, 0]] * 3), torch.tensor([0, 1, 2]), "embeddings"),
    (torch.tensor([[0.0, float("inf"), 1, 0]] * 3), torch.tensor([0, 1, 2]), "embeddings"),
    (torch.randn(0, 4), torch.zeros(0, dtype=torch.long), "embeddings"),
    (torch.randn(3, 4), torch.tensor([0, 1]), "labels"),                 # wrong length
    (torch.randn(3, 4), torch.tensor([[0, 1, 2]]), "labels"),            # 2-D
    (torch.randn(3, 4), torch.tensor([0.0, 1.0, 2.0]), "labels"),        # float labels
    (torch.randn(3, 4), torch.tensor([True, False, True]), "labels"),    # bool labels
    (torch.randn(3, 4), torch.tensor([0, 1, 5]), "labels"),              # >= C
    (torch.randn(3, 4), torch.tensor([0, -1, 2]), "labels"),             # < 0
    ([[0.0] * 4] * 3, torch.tensor([0, 1, 2]), "embeddings"),            # not a tensor
])
def test_bad_input_raises(x, y, name):
    crit = ProxyGML(5, 4)
    with pytest.raises(ValueError, match=name):
        crit(x, y)


def test_bench_dense_baseline_is_the_same_function():
    """bench/loss_bench.py's dense baseline computes the same loss (up to the released epsilons)."""
    from bench.loss_bench import dense_proxygml

    for seed, C, N, r in [(0, 12, 3, 0.1), (1, 30, 1, 0.05)]:
        x, proxies, labels = make_case(seed, C, N, 16, 20, torch.float64)
        crit = ProxyGML(C, 16, N, r=r, lam=0.3).double()
        with torch.no_grad():
            crit.proxies.copy_(proxies)
        assert dense_proxygml(x, proxies, labels, C, N, r, 0.3).item() == pytest.approx(
            crit(x, labels).item(), rel=1e-7)


@pytest.mark.timeout(60)
def test_scale_multiplies_z_before_the_softmax():
    """N 1, r 1, no class mask, lam 0: L^s is the cross-entropy of scale * cosines; every mode gives the same."""
    from loss.distributed import build_criterion
    torch.manual_seed(0)
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    kw = dict(proxies_per_class=1, r=1.0, lam=0.0, class_mask=False)
    crit = ProxyGML(4, 8, scale=7.5, **kw).double()
    logits = 7.5 * F.normalize(x, dim=1) @ F.normalize(crit.proxies, dim=1).t()
    torch.testing.assert_close(crit(x, y), F.cross_entropy(logits, y))
    base = ProxyGML(4, 8, **kw).double()
    base.load_state_dict(crit.state_dict())
    assert not torch.allclose(base(x, y), crit(x, y))
    for mode in ("gather", "sharded"):  # one process: the distributed forms take the same scale
        other = build_criterion(mode, 4, 8, scale=7.5, **kw).double()
        other.proxies.data.copy_(crit.proxies.data)
        torch.testing.assert_close(other(x, y), crit(x, y))
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="scale"):
            ProxyGML(4, 8, scale=bad)
