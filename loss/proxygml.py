"""The ProxyGML loss (Zhu et al., NeurIPS 2020) on one process: the authors' function, sparse and exact; and
ProxyGMLBase, what its distributed forms (loss/replicated.py, loss/sharded.py) share with it.

With x̂ = x/‖x‖, p̂ = p/‖p‖ and S = x̂ p̂ᵀ (M x CN), every sample keeps the k = ceil(r*C*N) proxies with the
largest similarity (its own class's proxies first with ``pos_mask``); Z (M x C) sums the kept similarities
per class ("reverse label propagation" Z = W Y^p); L^s is the mean of -log P(own class) under a softmax over
the classes with Z != 0 (``class_mask``) or over all C classes; L^p classifies every proxy against the class
sums of all proxies (logits p̂_i · Σ_{j in c} p̂_j), cross-entropy, mean over CN. L = L^s + lam * L^p.

How it is computed (the numbers are the dense formulation's; the work is a fraction of it):
- S is built once, the top-k is chosen without autograd, and only the k chosen similarities per sample
  leave the forward; their backward scatters into S's shape and runs two matmuls, so S is never kept.
- Z is a per-row segment sum of the chosen similarities by class (index // N): M x k numbers, never M x C,
  never the CN x C label matrix.
- L^p uses the class-sum vectors (C x dim): logits = P̂ @ sumsᵀ, in row chunks with a recomputing backward
  when CN x C is large (SOP with N = 4 is 45,272 x 11,318).
- Under autocast the similarities, the sums and every log-sum-exp stay in fp32; only the proxy-proxy
  product runs in the autocast dtype (fp32 accumulation), the one place where the flops are.

Where we differ from the released code's epsilons (loss/ProxyGML.py of YuehuaZhu/ProxyGML):
- the released softmax is exp(Z)*mask / (1e-8 + Σ exp(Z)*mask); we use the exact masked log-softmax
  (no 1e-8, numerically stable), which changes the loss by about 1e-8 relative;
- the released -log(P + 1e-20) is -log P here; a sample whose own class has P = 0 (with ``class_mask``: no
  edge into its class, or edges summing to exactly 0; possible only without ``pos_mask``) contributes the
  released constant -log(1e-20) with no gradient. Without ``class_mask`` P(own) > 0 always;
- the released code ranks own-class proxies first by adding 1000 to their similarity; we put them first
  exactly (identical whenever N <= k; with k < N the released fp32 sum rounds the order among them).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from loss.criterion import CriterionBase, NonFiniteEmbeddings

NO_EDGE_LOSS = -math.log(1e-20)  # the released code's -log(0 + 1e-20)
_NO_CLASS = torch.iinfo(torch.int64).max  # class id of padding entries in class_scores


def num_selected(r: float, num_proxies: int) -> int:
    """k = ceil(r * C * N): the size of each sample's subgraph."""
    return max(1, min(num_proxies, math.ceil(r * num_proxies)))


def check_config(num_classes, dim, proxies_per_class, r, lam) -> None:
    """Raise ValueError naming the first bad constructor argument."""
    for name, value, low in (("num_classes", num_classes, 2), ("dim", dim, 1),
                             ("proxies_per_class", proxies_per_class, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
        raise ValueError(f"r must be a number in (0, 1], got {r!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not lam >= 0 or math.isinf(lam):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")


def check_scale(scale) -> float:
    """The logit scale as a float; ValueError unless it is a finite number > 0."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    return float(scale)


def check_inputs(embeddings: Tensor, labels: Tensor, dim: int, num_classes: int) -> None:
    """Raise ValueError naming the bad argument (one host sync for the value checks); NonFiniteEmbeddings (a
    ValueError) for nan or inf in `embeddings`."""
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[1] != dim:
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings must have shape (M, {dim}), got {shape}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    if not isinstance(labels, Tensor) or labels.shape != embeddings.shape[:1]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},) like embeddings' rows, got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != embeddings.device:
        raise ValueError(f"labels are on {labels.device} but embeddings on {embeddings.device}")
    if embeddings.shape[0] == 0:
        raise ValueError("embeddings must hold at least one sample, got 0 rows")
    bad = torch.stack([~torch.isfinite(embeddings).all(), (labels < 0).any() | (labels >= num_classes).any()])
    bad_finite, bad_range = bad.tolist()
    if bad_finite:
        raise NonFiniteEmbeddings("embeddings contain non-finite values (nan or inf)")
    if bad_range:
        lo, hi = labels.min().item(), labels.max().item()
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


PROXY_INIT_BLOCK_ROWS = 4096  # rows of the proxy table drawn from one generator (init_proxy_rows)


def init_proxy_rows(num_rows: int, dim: int, first_row: int, stop_row: int, seed: int,
                    block_rows: int = PROXY_INIT_BLOCK_ROWS) -> Tensor:
    """Rows ``first_row:stop_row`` (float32, (stop_row - first_row, dim)) of the initial proxy table of
    ``num_rows`` (= C*N) rows for ``seed``.

    The distribution is the authors' init: kaiming-uniform (a=sqrt(5)) of their (dim, C*N) matrix, i.e.
    U(±1/sqrt(C*N)). The table is drawn in blocks of ``block_rows`` rows, block b from a generator seeded by
    a hash of (seed, b) (``block_seed``), so any slice of it is drawn without the rest: every mode (local,
    gather, sharded) and every world size start from the same table for one seed, and no rank ever builds the
    whole table to get its rows.
    """
    if not 0 <= first_row <= stop_row <= num_rows:
        raise ValueError(f"rows [{first_row}, {stop_row}) are not inside the table of {num_rows} rows")
    bound = 1 / math.sqrt(num_rows)
    out = torch.empty(stop_row - first_row, dim)
    for b in range(first_row // block_rows, -(-stop_row // block_rows)):
        lo, hi = b * block_rows, min((b + 1) * block_rows, num_rows)
        g = torch.Generator().manual_seed(block_seed(seed, b))
        rows = torch.rand(hi - lo, dim, generator=g) * (2 * bound) - bound
        a, z = max(lo, first_row), min(hi, stop_row)
        out[a - first_row:z - first_row] = rows[a - lo:z - lo]
    return out


def block_seed(seed: int, block: int) -> int:
    """The generator seed of block `block` of the proxy table for `seed`: a hash of both, so that the table's
    random numbers are not those of `torch.manual_seed(seed)` (the model's initialisation draws from that)."""
    digest = hashlib.sha256(f"proxygml.proxies/{int(seed)}/{int(block)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def proxy_seed(seed: int | None) -> int:
    """``seed``, or (None) one drawn from torch's global generator, so that ``torch.manual_seed`` governs it."""
    return int(torch.randint(0, 2 ** 31 - 1, ())) if seed is None else int(seed)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 inputs are promoted)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def amp_matmul_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype for the proxy-proxy product: the autocast dtype if autocast is on (and we are in fp32).

    Call it before entering the loss's own ``autocast(enabled=False)`` region.
    """
    if dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


# --- the subgraphs ---------------------------------------------------------------------------------------

@torch.no_grad()
def select_proxies(sim: Tensor, labels: Tensor, k: int, n: int, pos_mask: bool) -> Tensor:
    """Indices (M, k) of each row's k chosen proxies: own class first with pos_mask, then the largest sim.

    May write into ``sim`` but restores it exactly before returning.
    """
    if not pos_mask:
        return sim.topk(k, dim=1).indices
    own = labels[:, None] * n + torch.arange(n, device=sim.device)
    if k <= n:  # the k most similar of the own proxies, ties to the lower index
        order = sim.gather(1, own).sort(dim=1, descending=True, stable=True).indices[:, :k]
        return own.gather(1, order)
    saved = sim.gather(1, own)
    sim.scatter_(1, own, float("-inf"))
    rest = sim.topk(k - n, dim=1).indices
    sim.scatter_(1, own, saved)
    return torch.cat([own, rest], dim=1)


class _SelectedSimilarity(torch.autograd.Function):
    """vals[m, t] = x̂_m · p̂_idx[m,t] for the indices chosen by ``select(S)``; S itself is never saved.

    Backward: the chosen gradients scattered into S's shape, then dS @ p̂ and dSᵀ @ x̂ (what autograd
    through S.gather would do, without holding the M x CN similarity matrix until backward).
    """

    @staticmethod
    def forward(ctx, x: Tensor, p: Tensor, select: Callable[[Tensor], Tensor]):
        sim = x @ p.t()
        idx = select(sim)
        vals = sim.gather(1, idx)
        ctx.save_for_backward(x, p, idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_vals: Tensor, _grad_idx):
        x, p, idx = ctx.saved_tensors
        grad_sim = torch.zeros(x.shape[0], p.shape[0], dtype=grad_vals.dtype, device=grad_vals.device)
        grad_sim.scatter_add_(1, idx, grad_vals)
        grad_x = grad_sim @ p if ctx.needs_input_grad[0] else None
        grad_p = grad_sim.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_p, None


def selected_similarity(x: Tensor, p: Tensor, select: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """(vals, idx): the similarities x̂ p̂ᵀ at the indices ``select`` chooses, differentiable in x and p."""
    return _SelectedSimilarity.apply(x, p, select)


def class_scores(vals: Tensor, cls: Tensor, n: int, selected: Tensor | None = None):
    """Per row, the chosen similarities summed by class: (z, seg_cls, valid), each (M, k).

    Row m's distinct classes sit in the first positions of z (their sum) and seg_cls (their id), with
    valid marking them; entries where ``selected`` is False take no part.
    """
    if selected is not None:
        vals = vals.masked_fill(~selected, 0.0)
        cls = cls.masked_fill(~selected, _NO_CLASS)
    if n == 1:  # every chosen proxy is its own class
        valid = torch.ones_like(cls, dtype=torch.bool) if selected is None else selected
        return vals, cls, valid
    cls_sorted, order = cls.sort(dim=1)
    vals_sorted = vals.gather(1, order)
    first = torch.ones_like(cls_sorted, dtype=torch.bool)
    first[:, 1:] = cls_sorted[:, 1:] != cls_sorted[:, :-1]
    seg = first.long().cumsum(dim=1) - 1
    z = torch.zeros_like(vals).scatter_add(1, seg, vals_sorted)
    seg_cls = torch.full_like(cls, _NO_CLASS).scatter(1, seg, cls_sorted)
    return z, seg_cls, seg_cls != _NO_CLASS


def softmax_inputs(z: Tensor, seg_cls: Tensor, valid: Tensor, labels: Tensor, num_classes: int,
                   class_mask: bool):
    """The log-softmax pieces of each row: (logits, z_own, has_target), logits (M, k or k+1).

    logits holds -inf where a class takes no part; without class_mask a last column log(#classes without
    an edge) stands for their exp(0) terms. has_target is False where P(own) = 0 (class_mask, Z_own = 0).
    """
    own = valid & (seg_cls == labels[:, None])
    z_own = (z * own).sum(dim=1)
    if class_mask:
        has_target = own.any(dim=1) & (z_own != 0)
        logits = z.masked_fill(~(valid & (z != 0)), float("-inf"))
    else:
        has_target = torch.ones_like(labels, dtype=torch.bool)
        rest = (num_classes - valid.sum(dim=1)).to(z.dtype)
        logits = torch.cat([z.masked_fill(~valid, float("-inf")), rest.log()[:, None]], dim=1)
    return logits, z_own, has_target


def row_losses(logits: Tensor, z_own: Tensor, has_target: Tensor) -> Tensor:
    """-log P(own class) per row; the released constant -log(1e-20), without gradient, where P = 0."""
    safe = torch.where(has_target[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    return torch.where(has_target, torch.logsumexp(safe, dim=1) - z_own,
                       torch.full_like(z_own, NO_EDGE_LOSS))


# --- the proxy regulariser -------------------------------------------------------------------------------

class _ProxyCrossEntropySum(torch.autograd.Function):
    """Σ_i CE(rows_i · sumsᵀ, target_i), in row chunks of ``chunk`` rows; fp32 (or fp64) log-sum-exp.

    One chunk: the softmax is kept for backward. Several: only the per-row log-sum-exp is kept and the
    backward recomputes each chunk's logits (memory O(chunk x C)).
    """

    @staticmethod
    def forward(ctx, rows: Tensor, sums: Tensor, targets: Tensor, chunk: int, matmul_dtype: torch.dtype):
        out_dtype = rows.dtype
        sums_mm = sums.to(matmul_dtype)
        lse = torch.empty(rows.shape[0], dtype=out_dtype, device=rows.device)
        total = torch.zeros((), dtype=out_dtype, device=rows.device)
        single = rows.shape[0] <= chunk
        for a in range(0, rows.shape[0], chunk):
            logits = (rows[a:a + chunk].to(matmul_dtype) @ sums_mm.t()).to(out_dtype)
            lse[a:a + chunk] = torch.logsumexp(logits, dim=1)
            target_logit = logits.gather(1, targets[a:a + chunk, None])[:, 0]
            total += (lse[a:a + chunk] - target_logit).sum()
            if single:
                ctx.softmax = logits.sub_(lse[:, None]).exp_()
        ctx.chunk, ctx.matmul_dtype, ctx.single = chunk, matmul_dtype, single
        ctx.save_for_backward(rows, sums, targets, lse)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        rows, sums, targets, lse = ctx.saved_tensors
        mdt, chunk = ctx.matmul_dtype, ctx.chunk
        sums_mm = sums.to(mdt)
        grad_rows = torch.empty_like(rows)
        grad_sums = torch.zeros_like(sums)
        for a in range(0, rows.shape[0], chunk):
            rows_mm = rows[a:a + chunk].to(mdt)
            if ctx.single:
                g = ctx.softmax * grad_total
            else:
                g = (rows_mm @ sums_mm.t()).to(lse.dtype).sub_(lse[a:a + chunk, None]).exp_().mul_(grad_total)
            g.scatter_add_(1, targets[a:a + chunk, None], -grad_total.expand(g.shape[0], 1))
            g_mm = g.to(mdt)
            grad_rows[a:a + chunk] = (g_mm @ sums_mm).to(rows.dtype)
            grad_sums += (g_mm.t() @ rows_mm).to(sums.dtype)
        return grad_rows, grad_sums, None, None, None


def proxy_cross_entropy_sum(rows: Tensor, sums: Tensor, targets: Tensor, chunk_elements: int = 2 ** 28,
                            matmul_dtype: torch.dtype | None = None) -> Tensor:
    """Σ over rows of the cross-entropy of logits rows @ sumsᵀ (R x C) with ``targets`` (R,).

    Differentiable in rows and sums; chunks of rows keep each logits block under ``chunk_elements``.
    """
    chunk = max(1, chunk_elements // max(1, sums.shape[0]))
    return _ProxyCrossEntropySum.apply(rows, sums, targets, chunk, matmul_dtype or rows.dtype)


def class_sums(p: Tensor, n: int) -> Tensor:
    """Σ_{j in class c} p̂_j for class-major proxies (C*N, dim) -> (C, dim)."""
    return p if n == 1 else p.view(-1, n, p.shape[1]).sum(dim=1)


# --- the module ------------------------------------------------------------------------------------------

class ProxyGMLBase(CriterionBase):
    """What every ProxyGML form shares: the hyperparameters (declared here only; the forms pass theirs on), their
    checks and attributes, the proxy rows it holds (all of them, or one rank's block of classes), the selection
    counts and the statistics built on them."""

    def __init__(self, num_classes: int, dim: int, proxies_per_class: int = 1, r: float = 0.05,
                 lam: float = 0.3, pos_mask: bool = True, class_mask: bool = True, proxy_reg: bool = True,
                 *, chunk_elements: int = 2 ** 28, validate: bool = True, scale: float = 1.0, group=None):
        super().__init__()
        check_config(num_classes, dim, proxies_per_class, r, lam)
        self.scale = check_scale(scale)  # Z times scale before the softmax of L^s
        self.num_classes, self.dim, self.proxies_per_class = num_classes, dim, proxies_per_class
        self.r, self.lam = float(r), float(lam)
        self.pos_mask, self.class_mask, self.proxy_reg = bool(pos_mask), bool(class_mask), bool(proxy_reg)
        self.chunk_elements, self.validate, self.group = int(chunk_elements), bool(validate), group
        self.k = num_selected(self.r, num_classes * proxies_per_class)
        self.last_parts: dict[str, Tensor] = {}

    def hold_classes(self, start: int, stop: int, proxies: Tensor) -> None:
        """Hold the proxies of classes [start, stop) (rows start*N:stop*N of the table) and their counts."""
        n = self.proxies_per_class
        self.class_start, self.class_stop = start, stop
        self.proxy_start, self.proxy_stop = start * n, stop * n
        self.proxies = nn.Parameter(proxies)
        self.selection_counts: Tensor
        self.register_buffer("selection_counts", torch.zeros(self.proxy_stop - self.proxy_start,
                                                             dtype=torch.int64), persistent=False)

    @property
    def uses_proxy_reg(self) -> bool:
        return self.proxy_reg and self.lam > 0

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, proxies_per_class={self.proxies_per_class}, "
                f"r={self.r}, k={self.k}, lam={self.lam}, pos_mask={self.pos_mask}, "
                f"class_mask={self.class_mask}, proxy_reg={self.proxy_reg}, scale={self.scale}")

    def ddp_ignored_parameters(self) -> list[str]:
        """Names (relative to this module) of what DDP must leave alone: the per-rank selection counts."""
        return ["selection_counts"]

    def reset_selection_counts(self) -> None:
        self.selection_counts.zero_()

    def global_selection_counts(self) -> Tensor:
        """The (C*N,) selection counts of the global batch (collective in the distributed forms)."""
        return self.selection_counts.clone()

    def proxy_statistics(self):
        from loss.proxy_stats import reduced_proxy_statistics
        return reduced_proxy_statistics(self)

    def prepare(self, embeddings: Tensor, labels: Tensor) -> tuple[str, torch.dtype, torch.dtype]:
        """Check the inputs (unless ``validate=False``); (device type, compute dtype, dtype of the proxy-proxy
        product). Call before the loss's own ``autocast(enabled=False)`` region."""
        if self.validate:
            check_inputs(embeddings, labels, self.dim, self.num_classes)
        device_type = embeddings.device.type
        dtype = compute_dtype(embeddings, self.proxies)
        return device_type, dtype, amp_matmul_dtype(device_type, dtype)


class ProxyGML(ProxyGMLBase):
    """ProxyGML(num_classes, dim, proxies_per_class=1, r=0.05, lam=0.3, pos_mask=True, class_mask=True,
    proxy_reg=True, *, scale=1.0): ``loss = crit(embeddings (M, dim), labels (M,))``.

    ``proxies`` (C*N, dim) is class-major (proxy j is class j // N). After each forward ``last_parts`` holds
    the detached L^s and L^p; ``selection_counts`` (C*N,) int64 counts how often each proxy entered a
    sample's subgraph since ``reset_selection_counts()`` (not part of the state dict).
    ``chunk_elements`` bounds the logits block of L^p; ``validate=False`` skips the input checks (and their
    host sync). ``scale`` multiplies Z before the softmax of L^s (Z is a sum of at most k cosines, so the
    paper's logits span only [-k, k]; a temperature 1/scale, as in NormalizedSoftmax or ProxyNCA): 1 is the
    paper's loss; L^p is not scaled.
    """

    def __init__(self, num_classes: int, dim: int, *args, seed: int | None = None, **kwargs):
        super().__init__(num_classes, dim, *args, **kwargs)  # the hyperparameters: ProxyGMLBase
        rows = num_classes * self.proxies_per_class
        self.hold_classes(0, num_classes, init_proxy_rows(rows, dim, 0, rows, proxy_seed(seed)))

    def sample_losses(self, x: Tensor, p: Tensor, labels: Tensor) -> Tensor:
        """Per-sample -log P(own class), (M,), from normalised x (M, dim) and proxies p (CN, dim)."""
        n = self.proxies_per_class

        def select(sim: Tensor) -> Tensor:
            return select_proxies(sim, labels, self.k, n, self.pos_mask)

        vals, idx = selected_similarity(x, p, select)
        with torch.no_grad():
            self.selection_counts += torch.bincount(idx.flatten(), minlength=self.selection_counts.numel())
        z, seg_cls, valid = class_scores(vals * self.scale if self.scale != 1.0 else vals, idx // n, n)
        return row_losses(*softmax_inputs(z, seg_cls, valid, labels, self.num_classes, self.class_mask))

    def proxy_loss_sum(self, p: Tensor, rows: slice, matmul_dtype: torch.dtype) -> Tensor:
        """Σ of the L^p cross-entropies of proxy rows ``rows`` (normalised p, all C*N rows given)."""
        n = self.proxies_per_class
        targets = torch.arange(rows.start, rows.stop, device=p.device) // n
        mine = p if (rows.start, rows.stop) == (0, p.shape[0]) else p[rows]  # no slice backward when all
        return proxy_cross_entropy_sum(mine, class_sums(p, n), targets, self.chunk_elements, matmul_dtype)

    def normalised(self, embeddings: Tensor, labels: Tensor):
        """fp32-or-fp64, L2-normalised (x, p) and int64 labels; call under autocast(enabled=False)."""
        dtype = compute_dtype(embeddings, self.proxies)
        return (F.normalize(embeddings.to(dtype), dim=1), F.normalize(self.proxies.to(dtype), dim=1),
                labels.long(), dtype)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        device_type, _, mm_dtype = self.prepare(embeddings, labels)
        with torch.autocast(device_type, enabled=False):
            x, p, labels, dtype = self.normalised(embeddings, labels)
            loss_s = self.sample_losses(x, p, labels).mean()
            loss_p = (self.proxy_loss_sum(p, slice(0, p.shape[0]), mm_dtype) / p.shape[0]
                      if self.uses_proxy_reg else torch.zeros((), dtype=dtype, device=x.device))
            self.last_parts = {"loss_s": loss_s.detach(), "loss_p": loss_p.detach()}
            return loss_s + self.lam * loss_p if self.uses_proxy_reg else loss_s
