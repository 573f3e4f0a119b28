"""Distributed evaluation: every rank embeds its share of the test stream, rank 0 gathers and scores.

    result = evaluate(model, loader, device=env.device, recall_ks=[1, 2, 4, 8], nmi=True, map_r=True,
                      class_names=manifest.class_names)
    result.metrics        # {"recall_at_1": ..., "map_at_r": ..., "r_precision": ..., "nmi": ...} on rank 0
    result.per_class      # pandas DataFrame: class_name, recall_at_1, map_at_r, size, class_index

Per-rank counts may differ: the rows are gathered with collectives.all_gather_rows (uneven counts), and
samples seen twice (by key) are kept once, so every sample counts exactly once. The gathered set is sorted by
key, so the result does not depend on the world size. A rank that fails while
embedding makes every rank raise instead of leaving the others waiting in a collective.

Standalone: `python -m trainer.evaluate CHECKPOINT --data SHARDS_SPLIT_DIR` (trainer.evaluation.cli).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

import collectives
from trainer.evaluation.metrics import compute_metrics


@dataclass
class EvalResult:
    metrics: dict[str, float] | None  # None on ranks other than 0
    per_class: pd.DataFrame | None
    embeddings: torch.Tensor | None  # (N, D) float32 on the CPU, rows sorted by key
    labels: torch.Tensor | None  # (N,) int64
    keys: list[str] | None


def evaluate(model, loader, *, device, recall_ks, nmi: bool, map_r: bool, class_names=None, amp_dtype=None,
             backend: str | None = None) -> EvalResult:
    """Collective: call on every rank. Metrics and the gathered set come back on rank 0 only.

    recall_ks: the K of Recall@K; nmi: k-means NMI; map_r: MAP@R and R-precision; backend: the kNN's
    ("torch" | "faiss"; None: torch on CUDA, else faiss), all as trainer.evaluation.metrics.compute_metrics."""
    ks, nmi, map_r = tuple(int(k) for k in recall_ks), bool(nmi), bool(map_r)
    device = torch.device(device)
    try:
        local, error = embed(model, loader, device=device, amp_dtype=amp_dtype), None
    except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
        local, error = None, e
    gathered = gather_to_rank0(local, device=device, error=error)
    if gathered is None:
        return EvalResult(None, None, None, None, None)
    emb, labels, keys = deduplicate(*gathered)
    if len(labels) < 2:
        from trainer.errors import UserError
        raise UserError(f"evaluation: {len(labels)} readable sample(s) in the evaluated split: every other image "
                        "failed to decode (see the warnings above); check or rewrite that split's shards "
                        "(python -m data_shards write ... --overwrite)")
    if int(torch.unique(torch.as_tensor(labels), return_counts=True)[1].max()) < 2:
        from trainer.config import ConfigError
        raise ConfigError(f"data.test_split: each of the {len(labels)} test images is the only one of its class, so "
                          "no query has a match and Recall@K / MAP@R are undefined; write a test split with at "
                          "least 2 images per class")
    metrics, per_class = compute_metrics(emb, labels, recall_ks=ks, nmi=nmi, map_r=map_r,
                                         class_names=class_names, device=device, backend=backend)
    return EvalResult(metrics, per_class, emb.cpu(), labels.cpu(), keys)


# ---------------------------------------------------------------- embedding


@torch.no_grad()
def embed(model, loader, *, device, amp_dtype=None):
    """(embeddings (n, D) float32, labels (n,) int64, keys) of this rank's share, on `device`."""
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    embs, labels, keys = [], [], []
    images = None
    try:
        for batch in loader:
            images, y, k = _split_batch(batch, len(keys))
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = net(images.to(device, non_blocking=True))
            if out.ndim != 2 or len(out) != len(y):
                raise ValueError(f"model returned {tuple(out.shape)} for a batch of {len(y)}; expected (B, D)")
            embs.append(out.float())
            labels.append(torch.as_tensor(y, dtype=torch.int64, device=device))
            keys.extend(k)
    except RuntimeError as e:  # torch.OutOfMemoryError is one too; in the model or making the batch
        from trainer.errors import is_out_of_memory, out_of_memory
        if not is_out_of_memory(e):
            raise
        raise out_of_memory(e, images, "embedding the test split",
                            "eval.batch_size (the evaluation CLI: --batch-size) or data.transform.image_size") from None
    finally:
        net.train(was_training)
    if not embs:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.int64, device=device), []
    return torch.cat(embs), torch.cat(labels), keys


def _unwrap(model):
    """The bare module: DDP's and DeepSpeed's forward would sync buffers, a collective that uneven
    per-rank batch counts would hang."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine":
        return model.module
    return model


def _split_batch(batch, seen: int):
    if len(batch) == 3:
        images, y, keys = batch
    elif len(batch) == 2:  # a loader without keys: nothing to de-duplicate, positions stand in
        (images, y), keys = batch, [f"{seen + i:012d}" for i in range(len(batch[1]))]
    else:
        raise ValueError(f"eval loader must yield (images, labels, keys), got a {len(batch)}-tuple")
    if not isinstance(images, torch.Tensor):
        raise TypeError("eval loader yielded undecoded images (decode='none'): make it with decode='cpu', or "
                        "decode='gpu' and device=... (data_shards.eval_loader)")
    return images, y, list(keys)


# ---------------------------------------------------------------- gathering


def gather_to_rank0(local, *, device, error: BaseException | None = None):
    """All ranks' (embeddings, labels, keys) concatenated in rank order on rank 0; None elsewhere.

    Each rank's header (row count and width, or a failure) and keys go round with all_gather_object, the rows
    with all_gather_rows (uneven counts). If any rank passes an error, every rank raises.
    """
    size, rank = collectives.world()
    if size == 1:
        if error is not None:
            raise error
        return local
    from trainer.errors import USER_ERRORS, PeerFailed, UserError, one_line
    comm = collectives.comm_device(device)
    failure = (one_line(error), isinstance(error, USER_ERRORS)) if error is not None else None
    mine = (-1, 0, failure) if error is not None else (len(local[0]), local[0].shape[1], None)
    header = collectives.all_gather_object(mine)
    counts, dims = [h[0] for h in header], [h[1] for h in header]
    failed = [(r, h[2]) for r, h in enumerate(header) if h[2] is not None]
    if failed:
        users = [(r, msg) for r, (msg, is_user) in failed if is_user]
        if users:  # the input is wrong: every rank raises the same one line, rank 0 says it
            e = UserError("evaluation failed on " + "; ".join(f"rank {r}: {msg}" for r, msg in users))
            e.same_on_every_rank = True
            raise e
        if error is not None:
            raise error  # a bug: its traceback, on the rank it happened
        raise PeerFailed(f"evaluation failed on rank(s) {[r for r, _ in failed]} (its error is printed there)")
    dim = max(dims)
    if any(c and di != dim for c, di in zip(counts, dims)):
        raise RuntimeError(f"ranks produced embeddings of different widths: {dims}")
    emb, labels, keys = local
    emb = collectives.all_gather_rows(emb.reshape(len(emb), dim).to(comm))[0]
    labels = collectives.all_gather_rows(labels.to(comm))[0]
    all_keys = collectives.all_gather_object(keys)
    if rank != 0:
        return None
    return emb, labels, [k for ks in all_keys for k in ks]


def deduplicate(emb: torch.Tensor, labels: torch.Tensor, keys: list):
    """Keep the first row of every key; rows come back sorted by key."""
    if len(keys) != len(emb):
        raise ValueError(f"{len(keys)} keys for {len(emb)} embeddings")
    uniq, first, inverse = np.unique(np.asarray(keys), return_index=True, return_inverse=True)
    first_t = torch.as_tensor(first, device=labels.device)
    clash = labels != labels[first_t][torch.as_tensor(inverse.reshape(-1), device=labels.device)]
    if clash.any():
        key = keys[int(clash.nonzero()[0])]
        raise ValueError(f"sample key {key!r} appears with two different labels")
    return emb[first_t], labels[first_t], uniq.tolist()
