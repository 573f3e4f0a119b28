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

Checkpoints and every other use go through the ``Criterion`` contract (loss/criterion.py): ``full_state_dict()``
(collective) gives {"proxies": (C*N, dim)} like ``ProxyGML``'s state dict, ``load_full_state_dict()`` takes it on
any world size, ``optimizer_state_to_full`` / ``optimizer_state_from_full`` do the same for the proxies' optimizer
state. The forms live in loss/replicated.py (local, gather), loss/sharded.py and loss/sharded_topk.py (sharded).
"""

from __future__ import annotations

from torch import nn

from loss.criterion import Criterion
from loss.family import MODES
from loss.replicated import ReplicatedProxyGML
from loss.sharded import ShardedProxyGML


def build_criterion(mode: str, num_classes: int, dim: int, *, group=None, **proxygml_kwargs) -> Criterion:
    """The ProxyGML criterion for ``mode`` (local | gather | sharded) on the current process group.

    Without an initialised process group every mode is one process (world size 1).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "sharded":
        return ShardedProxyGML(num_classes, dim, group=group, **proxygml_kwargs)
    return ReplicatedProxyGML(num_classes, dim, mode=mode, group=group, **proxygml_kwargs)


def ddp_ignored_names(module: nn.Module, criterion: Criterion) -> list[str]:
    """Fully qualified names (in ``module``) of ``criterion``'s parameters and buffers that DDP must leave alone
    (``criterion.ddp_ignored_parameters()``; ``criterion`` is ``module`` itself or one of its submodules)."""
    prefix = next((name for name, m in module.named_modules() if m is criterion), None)
    if prefix is None:
        raise ValueError("criterion is not a submodule of module")
    return [f"{prefix}.{n}" if prefix else n for n in criterion.ddp_ignored_parameters()]


def ddp_ignore(module: nn.Module, criterion: Criterion) -> list[str]:
    """Keep ``criterion``'s rank-owned parameters and buffers, inside ``module``, out of DDP.

    Call before ``DistributedDataParallel(module, ...)``; returns the fully qualified names.
    """
    from torch.nn.parallel import DistributedDataParallel

    names = ddp_ignored_names(module, criterion)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    return names
