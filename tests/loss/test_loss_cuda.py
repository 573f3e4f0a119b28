"""ProxyGML on a real CUDA device against the float64 dense reference: fp32, TF32 matmuls and bf16 autocast
(marked gpu: excluded by default, run with `-m gpu` on a GPU host; bench/gpu_check.sh does).

Not yet run: no GPU was lent while this was written; the TF32 and bf16 tolerances are stated, not measured.
The cases are small and well separated, so reduced precision cannot flip a top-k choice: what differs is
rounding alone.
"""
import pytest
import torch

from loss import ProxyGML
from tests.loss.test_loss import make_case, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# precision: (relative tolerance of the loss, tolerance of each gradient relative to its largest entry)
TOLERANCE = {"fp32": (1e-5, 1e-5), "tf32": (5e-3, 5e-2), "bf16": (2e-2, 5e-2)}


@pytest.fixture
def tf32_off():
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("precision", list(TOLERANCE))
@pytest.mark.parametrize("C, N, dim, M, r", [(10, 2, 16, 12, 0.25), (7, 1, 8, 9, 0.3)])
def test_cuda_matches_the_float64_reference(precision, C, N, dim, M, r, tf32_off):
    x, proxies, labels = make_case(0, C, N, dim, M, torch.float32)
    crit = ProxyGML(C, dim, N, r=r, lam=0.3).cuda()
    with torch.no_grad():
        crit.proxies.copy_(proxies)
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    xa = x.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = crit(xa, labels.cuda())
    assert loss.dtype == torch.float32
    loss.backward()
    xr, pr = x.double().requires_grad_(), proxies.double().requires_grad_()
    ref = reference(xr, pr, labels, C, N, r, 0.3, True, True, True)[0]
    ref.backward()
    loss_tol, grad_tol = TOLERANCE[precision]
    assert abs(loss.item() - ref.item()) <= loss_tol * abs(ref.item()), (loss.item(), ref.item())
    for got, want in ((xa.grad, xr.grad), (crit.proxies.grad, pr.grad)):
        assert got.is_cuda and torch.isfinite(got).all()
        assert (got.cpu().double() - want).abs().max() <= grad_tol * want.abs().max(), precision


def test_cuda_sop_size_step_runs_and_agrees_with_the_cpu(tf32_off):
    """SOP's shape (11,318 classes, N=1, M=256, lam 0.3): the chunked regulariser on CUDA, fp32, equals the
    CPU's within fp32 reduction-order differences (a near-tie at the top-k boundary may pick another proxy on
    one device, so the gradients are compared by their norm)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    x, proxies, labels = make_case(1, 11318, 1, 512, 256, torch.float32)
    losses, grads = [], []
    for device in ("cpu", "cuda"):
        crit = ProxyGML(11318, 512, 1, r=0.05, lam=0.3).to(device)
        with torch.no_grad():
            crit.proxies.copy_(proxies)
        xa = x.to(device).requires_grad_()
        loss = crit(xa, labels.to(device))
        loss.backward()
        losses.append(loss.item())
        grads.append(crit.proxies.grad.cpu())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    assert torch.isfinite(grads[1]).all()
    assert grads[1].norm().item() == pytest.approx(grads[0].norm().item(), rel=1e-2)
