"""ProxyGML across ranks: ``local``, ``gather`` (the default) and ``sharded`` (classes split over ranks).

    crit = build_criterion(mode, num_classes, dim, **proxygml_kwargs)   # on every rank, after init_process_group
    loss = crit(local_embeddings, local_labels)                         # same call on every rank

Every mode gives, after DDP's gradient averaging, the update of one process on the concatenated batch.
The returned scalar's *value* is the global loss L = L^s + lam L^p on every rank; its *gradient* is scaled
for DDP (``value + (surrogate - surrogate.detach())``): local batches may differ in size.

- ``local``: each rank's subgraphs cover its own samples (ProxyGML's rows are independent); its loss is
  weighted W * M_rank / M_global, so DDP's average is the global mean. No all-gather; one all-reduce of
  three numbers (the global sample count and the parts for logging).
- ``gather``: embeddings are all-gathered with gradients (``torch.distributed.nn.functional.all_gather``:
  each rank's embeddings get back the sum of all ranks' gradients, W times their share) and labels without;
  every rank builds the subgraphs of the whole global batch (the path of losses with sample-sample terms).
- both: L^p depends only on the (replicated) proxies, so rank r computes only its block of proxy rows
  against all class sums, weighted W; DDP's average then sums the blocks.
- ``sharded``: rank r owns a contiguous block of classes, their proxies (outside DDP, see
  ``ddp_ignored_parameters``) and their optimizer state; embeddings are all-gathered (gradient scaled by W
  for DDP); the top-k is global: ceil(2k/W) local candidates per sample (all min(k, C_r N) of them when
  some rank's list proves too short), then a bisection on (similarity, -global index) keys with all-reduced
  counts: 32 rounds on the value, 32 more only when a tie at the threshold must be split; exact, ties to
  the lower global proxy index, O(M) communication whatever k is;
  the masked softmax is global (an all-gather of each rank's max and sum of exponentials per sample; the
  backward is local); the target logit comes from the owning rank; L^p classifies each rank's proxies
  against all class sums, gathered with gradients. Proxy and similarity memory per rank fall as 1/W.
  Selection keys are the float32 similarities (float64 inputs are ranked by their float32 rounding).

Checkpoints: ``full_state_dict()`` (collective) gives {"proxies": (C*N, dim)} like ``ProxyGML``'s state
dict; ``load_full_state_dict()`` takes it on any world size. ``shard_rows`` / ``gather_rows`` do the same
for optimizer state shaped like the proxies.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from loss.collectives import all_gather_rows, all_reduce_, block, world
from loss.proxygml import (
    ProxyGML,
    amp_matmul_dtype,
    check_config,
    check_inputs,
    check_scale,
    class_scores,
    class_sums,
    compute_dtype,
    num_selected,
    proxy_cross_entropy_sum,
    row_losses,
    selected_similarity,
    softmax_inputs,
)

MODES = ("local", "gather", "sharded")


def build_criterion(mode: str, num_classes: int, dim: int, *, group=None, **proxygml_kwargs) -> nn.Module:
    """The ProxyGML criterion for ``mode`` (local | gather | sharded) on the current process group.

    Without an initialised process group every mode is one process (world size 1).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "sharded":
        return ShardedProxyGML(num_classes, dim, group=group, **proxygml_kwargs)
    return ReplicatedProxyGML(num_classes, dim, mode=mode, group=group, **proxygml_kwargs)


def ddp_ignore(module: nn.Module, criterion: nn.Module) -> list[str]:
    """Keep ``criterion``'s rank-owned parameters and buffers, inside ``module``, out of DDP.

    Call before ``DistributedDataParallel(module, ...)``; returns the fully qualified names.
    """
    prefix = next((name for name, m in module.named_modules() if m is criterion), None)
    if prefix is None:
        raise ValueError("criterion is not a submodule of module")
    names = [f"{prefix}.{n}" if prefix else n for n in criterion.ddp_ignored_parameters()]
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (so that DDP's average keeps the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class _ShardedLogSumExp(torch.autograd.Function):
    """Row-wise log-sum-exp over the pieces of all ranks (-inf entries take no part); local backward.

    Rows must have at least one finite entry on some rank.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, group):
        size, _ = world(group)
        local_max = logits.max(dim=1).values
        shift = torch.where(torch.isfinite(local_max), local_max, torch.zeros_like(local_max))
        local_sum = (logits - shift[:, None]).exp().sum(dim=1)
        mine = torch.stack([local_max, local_sum])
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=group)
        maxes, sums = torch.stack(parts).unbind(dim=1)  # (W, M) each
        top = maxes.max(dim=0).values
        lse = top + (sums * (maxes - top).exp()).sum(dim=0).log()
        ctx.save_for_backward(logits, lse)
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        logits, lse = ctx.saved_tensors
        return (logits - lse[:, None]).exp() * grad[:, None], None


def order_keys(vals: Tensor, global_idx: Tensor) -> Tensor:
    """int64 keys ordered like (float32 value descending... as a number, then global index ascending)."""
    bits = (vals.float() + 0.0).view(torch.int32).long()  # + 0.0 turns -0.0 into +0.0
    value_key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotonic in the float value
    return value_key * (1 << 32) + ((1 << 32) - 1 - global_idx)


@torch.no_grad()
def sharded_topk(scores: Tensor, need: int, offset: int, group=None,
                 candidates: int | None = None) -> tuple[Tensor, Tensor]:
    """This rank's share of each row's global top-``need`` by (score, lower global index first).

    ``scores`` (M, K_r) are this rank's columns, global index ``offset + j``. Returns (idx, mask), both
    (M, kk); mask marks the local indices that are in the global top-need. Each rank first keeps
    kk = ``candidates`` (default: need) local candidates per row; if some rank's list turns out too short
    for the threshold found (all ranks agree on that), the selection is redone with kk = min(need, K_r).
    """
    full = min(need, scores.shape[1])
    if candidates is None or world(group)[0] == 1:
        return _topk_from_candidates(scores, full, need, offset, group)[:2]
    idx, mask, complete = _topk_from_candidates(scores, max(1, min(full, candidates)), need, offset, group)
    flag = complete.all().to(torch.int64).reshape(1)
    if world(group)[0] > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    if bool(flag.item()):
        return idx, mask
    return _topk_from_candidates(scores, full, need, offset, group)[:2]


def _topk_from_candidates(scores: Tensor, kk: int, need: int, offset: int, group):
    """(idx, mask, complete): the selection from kk local candidates per row; complete marks the rows whose
    candidates hold every local entry that can reach the threshold found (then the selection is exact)."""
    cols = scores.shape[1]
    vals, idx = scores.topk(min(kk + 1, cols), dim=1)
    if vals.shape[1] > kk:  # a tie across the cut: take those rows by a stable sort (lower index first)
        straddle = (vals[:, kk - 1] == vals[:, kk]).nonzero()[:, 0]
        vals, idx = vals[:, :kk].clone(), idx[:, :kk].clone()
        if straddle.numel():
            sv, si = scores[straddle].sort(dim=1, descending=True, stable=True)
            vals[straddle], idx[straddle] = sv[:, :kk], si[:, :kk]
    keys = order_keys(vals, idx + offset)
    ascending = keys.sort(dim=1).values
    # the float value first (32 rounds); the global index only when a tie at the threshold must be split
    value_keys = ascending >> 32
    value = _bisect(value_keys, kk, need, -(1 << 31), 1 << 31, 32, group)
    complete = (value_keys[:, 0] < value) | (kk == cols)  # entries left out are below the threshold value
    at_least = _count_at_least(value_keys, kk, value)
    all_reduce_(at_least, group=group)
    if bool((at_least == need).all()):  # the same answer on every rank: no index rounds anywhere
        return idx, ((keys >> 32) >= value[:, None]) & torch.isfinite(vals), complete
    lo = _bisect(ascending, kk, need, value * (1 << 32), (value + 1) * (1 << 32), 32, group)
    return idx, (keys >= lo[:, None]) & torch.isfinite(vals), complete


def _count_at_least(ascending: Tensor, kk: int, t: Tensor) -> Tensor:
    return kk - torch.searchsorted(ascending, t[:, None], side="left")[:, 0]


def _bisect(ascending: Tensor, kk: int, need: int, lo, hi, rounds: int, group) -> Tensor:
    """Per row the largest t in [lo, hi) with #(entries >= t) >= need over all ranks.

    Needs #(>= lo) >= need > #(>= hi) and hi - lo <= 2**rounds; one all-reduce of M counts per round.
    """
    rows = ascending.shape[0]
    lo = torch.as_tensor(lo, dtype=torch.long, device=ascending.device).expand(rows).clone()
    hi = torch.as_tensor(hi, dtype=torch.long, device=ascending.device).expand(rows).clone()
    for _ in range(rounds):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow
        count = _count_at_least(ascending, kk, mid)
        all_reduce_(count, group=group)
        ok = count >= need
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


# --- replicated proxies: local and gather -----------------------------------------------------------------

class ReplicatedProxyGML(ProxyGML):
    """ProxyGML with proxies replicated on every rank (inside DDP): ``mode`` is ``local`` or ``gather``."""

    def __init__(self, num_classes: int, dim: int, proxies_per_class: int = 1, r: float = 0.05,
                 lam: float = 0.3, pos_mask: bool = True, class_mask: bool = True, proxy_reg: bool = True,
                 *, mode: str = "gather", group=None, **kwargs):
        super().__init__(num_classes, dim, proxies_per_class, r, lam, pos_mask, class_mask, proxy_reg, **kwargs)
        if mode not in ("local", "gather"):
            raise ValueError(f"mode must be 'local' or 'gather', got {mode!r}")
        self.mode, self.group = mode, group

    def extra_repr(self) -> str:
        return f"mode={self.mode}, " + super().extra_repr()

    def ddp_ignored_parameters(self) -> list[str]:
        """Names (relative to this module) of what DDP must leave alone: the per-rank selection counts."""
        return ["selection_counts"]

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.validate:
            check_inputs(embeddings, labels, self.dim, self.num_classes)
        size, rank = world(self.group)
        device_type = embeddings.device.type
        dtype = compute_dtype(embeddings, self.proxies)
        mm_dtype = amp_matmul_dtype(device_type, dtype)
        with torch.autocast(device_type, enabled=False):
            x, labels = embeddings.to(dtype), labels.long()
            if self.mode == "gather" and size > 1:
                x, _ = all_gather_rows(x, self.group, with_grad=True)
                labels, _ = all_gather_rows(labels, self.group)
            p = F.normalize(self.proxies.to(dtype), dim=1)
            rows = self.sample_losses(F.normalize(x, dim=1), p, labels)
            num_proxies = p.shape[0]
            if self.uses_proxy_reg:
                start, stop = block(num_proxies, size, rank)
                reg_sum = self.proxy_loss_sum(p, slice(start, stop), mm_dtype)
            else:
                reg_sum = torch.zeros((), dtype=dtype, device=x.device)
            local = self.mode == "local"
            stats = torch.stack([rows.detach().sum() if local else rows.new_zeros(()),
                                 rows.new_tensor(float(rows.shape[0] if local else 0)), reg_sum.detach()])
            if size > 1:
                dist.all_reduce(stats, group=self.group)
            num_samples = stats[1] if local else rows.shape[0]
            loss_s = stats[0] / num_samples if local else rows.detach().mean()
            loss_p = stats[2] / num_proxies
            self.last_parts = {"loss_s": loss_s, "loss_p": loss_p}
            surrogate = rows.sum() / num_samples * (size if local else 1)
            value = loss_s
            if self.uses_proxy_reg:
                surrogate = surrogate + self.lam * size * reg_sum / num_proxies
                value = value + self.lam * loss_p
            return value + (surrogate - surrogate.detach())

    def global_selection_counts(self) -> Tensor:
        """Selection counts of the global batch (collective in ``local`` mode: call on every rank)."""
        counts = self.selection_counts.clone()
        if self.mode == "local" and world(self.group)[0] > 1:
            dist.all_reduce(counts, group=self.group)
        return counts

    def full_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        self.load_state_dict(state)

    def shard_rows(self, full: Tensor) -> Tensor:
        return full

    def gather_rows(self, rows: Tensor) -> Tensor:
        return rows


# --- sharded proxies -----------------------------------------------------------------------------------------

class ShardedProxyGML(nn.Module):
    """ProxyGML with a contiguous block of classes (and their proxies) per rank; see the module docstring.

    ``proxies`` (C_r*N, dim) are this rank's, global rows ``proxy_start:proxy_stop``; ``selection_counts``
    likewise. ``candidate_factor``: each rank first ranks ceil(factor * k / W) local candidates per sample
    (exact whatever it is: a rank whose list is too short makes all ranks redo it with min(k, C_r*N));
    the candidate lists are the largest memory term at millions of classes. The initialisation is the
    authors' distribution U(±1/sqrt(C*N)), drawn per block of 4,096
    global rows from a generator seeded by (``seed``, block), so that it does not depend on the world size.
    """

    def __init__(self, num_classes: int, dim: int, proxies_per_class: int = 1, r: float = 0.05,
                 lam: float = 0.3, pos_mask: bool = True, class_mask: bool = True, proxy_reg: bool = True,
                 *, group=None, chunk_elements: int = 2 ** 28, validate: bool = True, seed: int = 0,
                 candidate_factor: float = 2.0, scale: float = 1.0):
        super().__init__()
        check_config(num_classes, dim, proxies_per_class, r, lam)
        self.scale = check_scale(scale)  # Z times scale before the softmax, as in ProxyGML
        size, rank = world(group)
        if num_classes < size:
            raise ValueError(f"num_classes ({num_classes}) must be >= the world size ({size}) in sharded mode")
        self.num_classes, self.dim, self.proxies_per_class = num_classes, dim, proxies_per_class
        self.r, self.lam = float(r), float(lam)
        self.pos_mask, self.class_mask, self.proxy_reg = bool(pos_mask), bool(class_mask), bool(proxy_reg)
        self.chunk_elements, self.validate, self.group = int(chunk_elements), bool(validate), group
        if not candidate_factor > 0:
            raise ValueError(f"candidate_factor must be > 0, got {candidate_factor!r}")
        self.candidate_factor = float(candidate_factor)
        self.k = num_selected(self.r, num_classes * proxies_per_class)
        self.class_start, self.class_stop = block(num_classes, size, rank)
        n = proxies_per_class
        self.proxy_start, self.proxy_stop = self.class_start * n, self.class_stop * n
        self.proxies = nn.Parameter(self._init_rows(seed))
        self.register_buffer("selection_counts", torch.zeros(self.proxy_stop - self.proxy_start,
                                                             dtype=torch.int64), persistent=False)
        self.last_parts: dict[str, Tensor] = {}

    def _init_rows(self, seed: int, rows_per_block: int = 4096) -> Tensor:
        total = self.num_classes * self.proxies_per_class
        bound = 1 / math.sqrt(total)
        first, last = self.proxy_start // rows_per_block, (self.proxy_stop - 1) // rows_per_block
        parts = []
        for b in range(first, last + 1):
            g = torch.Generator().manual_seed(seed * 1_000_003 + b)
            n = min(rows_per_block, total - b * rows_per_block)
            parts.append(torch.rand(n, self.dim, generator=g) * (2 * bound) - bound)
        start = self.proxy_start - first * rows_per_block
        return torch.cat(parts)[start:start + self.proxy_stop - self.proxy_start].contiguous()

    def extra_repr(self) -> str:
        return (f"mode=sharded, num_classes={self.num_classes}, classes=[{self.class_start}, {self.class_stop}), "
                f"dim={self.dim}, proxies_per_class={self.proxies_per_class}, r={self.r}, k={self.k}, "
                f"lam={self.lam}, pos_mask={self.pos_mask}, class_mask={self.class_mask}, "
                f"proxy_reg={self.proxy_reg}, scale={self.scale}")

    @property
    def uses_proxy_reg(self) -> bool:
        return self.proxy_reg and self.lam > 0

    def ddp_ignored_parameters(self) -> list[str]:
        """Names (relative to this module) that DDP must leave alone: the rank-owned proxies and counts."""
        return ["proxies", "selection_counts"]

    def reset_selection_counts(self) -> None:
        self.selection_counts.zero_()

    # the subgraphs across shards
    def _select(self, sim: Tensor, labels: Tensor, out: dict) -> Tensor:
        """Local indices (M, *) of this rank's chosen proxies; out["mask"] marks the real ones."""
        n, k = self.proxies_per_class, self.k
        local_rows = (labels >= self.class_start) & (labels < self.class_stop)
        own = (labels - self.class_start).clamp(0, self.class_stop - self.class_start - 1)[:, None] * n
        own = own + torch.arange(n, device=sim.device)
        own_mask = local_rows[:, None].expand(-1, n)
        if self.pos_mask and k <= n:  # only own proxies: all on the owning rank
            order = sim.gather(1, own).sort(dim=1, descending=True, stable=True).indices[:, :k]
            out["mask"] = own_mask[:, :k]
            return own.gather(1, order)
        need = k - n if self.pos_mask else k
        if self.pos_mask:
            saved = sim.gather(1, own)
            sim.scatter_(1, own, torch.where(own_mask, float("-inf"), saved))
        size = world(self.group)[0]
        candidates = math.ceil(self.candidate_factor * need / size)
        idx, mask = sharded_topk(sim, need, self.proxy_start, self.group, candidates)
        if not self.pos_mask:
            out["mask"] = mask
            return idx
        sim.scatter_(1, own, saved)
        out["mask"] = torch.cat([own_mask, mask], dim=1)
        return torch.cat([own, idx], dim=1)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        if self.validate:
            check_inputs(embeddings, labels, self.dim, self.num_classes)
        size, _ = world(self.group)
        device_type = embeddings.device.type
        dtype = compute_dtype(embeddings, self.proxies)
        mm_dtype = amp_matmul_dtype(device_type, dtype)
        n = self.proxies_per_class
        with torch.autocast(device_type, enabled=False):
            x, labels = embeddings.to(dtype), labels.long()
            if size > 1:
                x, _ = all_gather_rows(_ScaleGrad.apply(x, float(size)), self.group, with_grad=True)
                labels, _ = all_gather_rows(labels, self.group)
            x, p = F.normalize(x, dim=1), F.normalize(self.proxies.to(dtype), dim=1)
            out: dict = {}
            vals, idx = selected_similarity(x, p, lambda sim: self._select(sim, labels, out))
            mask = out["mask"]
            with torch.no_grad():
                self.selection_counts += torch.bincount(idx[mask], minlength=self.selection_counts.numel())
            z, seg_cls, valid = class_scores(vals * self.scale if self.scale != 1.0 else vals,
                                             idx // n + self.class_start, n, mask)
            logits, z_own, has_target = softmax_inputs(z, seg_cls, valid, labels,
                                                       self.class_stop - self.class_start, self.class_mask)
            rows_s, loss_s = self._sample_part(logits, z_own, has_target, size)
            reg_sum, loss_p = self._proxy_part(p, mm_dtype, size)
            self.last_parts = {"loss_s": loss_s, "loss_p": loss_p}
            surrogate, value = rows_s.sum() / rows_s.shape[0], loss_s
            if self.uses_proxy_reg:
                num_proxies = self.num_classes * n
                surrogate = surrogate + self.lam * reg_sum / num_proxies
                value = value + self.lam * loss_p
            return value + (surrogate - surrogate.detach())

    def _sample_part(self, logits: Tensor, z_own: Tensor, has_target: Tensor, size: int):
        """(per-row surrogate with this shard's gradient, global L^s detached)."""
        target = torch.stack([z_own.detach(), has_target.to(z_own.dtype)])
        if size > 1:
            dist.all_reduce(target, group=self.group)  # the owner holds z_own and the flag; others 0
        z_own_all, ok = target[0], target[1] > 0
        safe = torch.where(ok[:, None], logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        lse = _ShardedLogSumExp.apply(safe, self.group) if size > 1 else torch.logsumexp(safe, dim=1)
        values = row_losses(lse.detach()[:, None], z_own_all, ok)  # logsumexp of one column is itself
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        return torch.where(ok, lse - z_own, zero), values.mean()

    def _proxy_part(self, p: Tensor, mm_dtype: torch.dtype, size: int):
        """(this rank's Σ of L^p cross-entropies with gradients, global L^p detached)."""
        if not self.uses_proxy_reg:
            zero = torch.zeros((), dtype=p.dtype, device=p.device)
            return zero, zero
        sums = class_sums(p, self.proxies_per_class)
        if size > 1:
            sums, _ = all_gather_rows(sums, self.group, with_grad=True)
        targets = torch.arange(self.proxy_start, self.proxy_stop, device=p.device) // self.proxies_per_class
        reg_sum = proxy_cross_entropy_sum(p, sums, targets, self.chunk_elements, mm_dtype)
        total = reg_sum.detach().clone()
        if size > 1:
            dist.all_reduce(total, group=self.group)
        return reg_sum, total / (self.num_classes * self.proxies_per_class)

    # checkpoints and statistics across world sizes
    def gather_rows(self, rows: Tensor) -> Tensor:
        """The full (C*N, ...) tensor, on the CPU, from every rank's block of proxy rows (collective).

        One rank's block at a time is broadcast, so the device holds one block more, not C*N rows.
        """
        size, rank = world(self.group)
        rows = rows.detach()
        if size == 1:
            return rows.cpu().clone()
        n = self.num_classes * self.proxies_per_class
        parts = []
        for src in range(size):
            start, stop = block(self.num_classes, size, src)
            if src == rank:
                buf = rows.contiguous()
            else:
                buf = rows.new_empty((stop - start) * self.proxies_per_class, *rows.shape[1:])
            dist.broadcast(buf, dist.get_global_rank(self.group, src) if self.group is not None else src,
                           group=self.group)
            parts.append(buf.cpu())
        full = torch.cat(parts)
        assert full.shape[0] == n
        return full

    def shard_rows(self, full: Tensor) -> Tensor:
        """This rank's block of a full (C*N, ...) tensor shaped like the proxies."""
        total = self.num_classes * self.proxies_per_class
        if full.shape[0] != total:
            raise ValueError(f"expected {total} proxy rows, got {tuple(full.shape)}")
        return full[self.proxy_start:self.proxy_stop]

    def full_state_dict(self) -> dict[str, Tensor]:
        """{"proxies": (C*N, dim)} as ``ProxyGML.state_dict()`` (collective: call on every rank)."""
        return {"proxies": self.gather_rows(self.proxies)}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load a full {"proxies": (C*N, dim)} (from any world size, or from ``ProxyGML``)."""
        if "proxies" not in state:
            raise ValueError(f"state has no 'proxies' entry (keys: {sorted(state)})")
        full = state["proxies"]
        if tuple(full.shape) != (self.num_classes * self.proxies_per_class, self.dim):
            raise ValueError(f"state['proxies'] must have shape ({self.num_classes * self.proxies_per_class}, "
                             f"{self.dim}), got {tuple(full.shape)}")
        with torch.no_grad():
            self.proxies.copy_(self.shard_rows(full))

    def global_selection_counts(self) -> Tensor:
        """The (C*N,) selection counts of all shards (collective: call on every rank)."""
        return self.gather_rows(self.selection_counts)
