"""Distributed evaluation: every rank embeds its share of the test stream, rank 0 gathers and scores.

    result = evaluate(model, loader, device=env.device, cfg_eval=cfg.eval, class_names=manifest.class_names)
    result.metrics        # {"recall_at_1": ..., "map_at_r": ..., "r_precision": ..., "nmi": ...} on rank 0
    result.per_class      # pandas DataFrame: class_index, class_name, size, recall_at_1, map_at_r

Per-rank counts may differ: each rank pads its rows to the largest count for the all-gather, the padding is
cut off by count, and samples seen twice (by key) are kept once, so every sample counts exactly once. The
gathered set is sorted by key, so the result does not depend on the world size. A rank that fails while
embedding makes every rank raise instead of leaving the others waiting in a collective.

Standalone: `python -m trainer.evaluate CHECKPOINT --data SHARDS_SPLIT_DIR` (see `main`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from trainer.metrics import compute_metrics


@dataclass
class EvalResult:
    metrics: dict[str, float] | None  # None on ranks other than 0
    per_class: pd.DataFrame | None
    embeddings: torch.Tensor | None  # (N, D) float32 on the CPU, rows sorted by key
    labels: torch.Tensor | None  # (N,) int64
    keys: list[str] | None


def evaluate(model, loader, *, device, cfg_eval, class_names=None, amp_dtype=None) -> EvalResult:
    """Collective: call on every rank. Metrics and the gathered set come back on rank 0 only."""
    ks, nmi, map_r = _eval_options(cfg_eval)
    device = torch.device(device)
    try:
        local, error = embed(model, loader, device=device, amp_dtype=amp_dtype), None
    except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
        local, error = None, e
    gathered = gather_to_rank0(local, device=device, error=error)
    if gathered is None:
        return EvalResult(None, None, None, None, None)
    emb, labels, keys = deduplicate(*gathered)
    if len(labels) and int(torch.unique(torch.as_tensor(labels), return_counts=True)[1].max()) < 2:
        from trainer.config import ConfigError
        raise ConfigError(f"data.test_split: each of the {len(labels)} test images is the only one of its class, so "
                          "no query has a match and Recall@K / MAP@R are undefined; write a test split with at "
                          "least 2 images per class")
    metrics, per_class = compute_metrics(emb, labels, recall_ks=ks, nmi=nmi, map_r=map_r,
                                         class_names=class_names, device=device)
    return EvalResult(metrics, per_class, emb.cpu(), labels.cpu(), keys)


def _eval_options(cfg_eval):
    missing = [a for a in ("recall_ks", "nmi", "map_r") if not hasattr(cfg_eval, a)]
    if missing:
        raise ValueError(f"cfg_eval lacks {missing} (expected the eval section of the config)")
    return tuple(int(k) for k in cfg_eval.recall_ks), bool(cfg_eval.nmi), bool(cfg_eval.map_r)


# ---------------------------------------------------------------- embedding


@torch.no_grad()
def embed(model, loader, *, device, amp_dtype=None):
    """(embeddings (n, D) float32, labels (n,) int64, keys) of this rank's share, on `device`."""
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    embs, labels, keys = [], [], []
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
        raise TypeError("eval loader yielded undecoded images: use decode='cpu', or wrap it with "
                        "data_shards.gpu_transforms.device_batches(..., train=False)")
    return images, y, list(keys)


# ---------------------------------------------------------------- gathering


def gather_to_rank0(local, *, device, error: BaseException | None = None):
    """All ranks' (embeddings, labels, keys) concatenated in rank order on rank 0; None elsewhere.

    Rows are padded to the largest per-rank count for the collective and cut back by count. If any rank
    passes an error, every rank raises.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return local
    comm = _comm_device(device)
    n, d = (-1, 0) if error is not None else (len(local[0]), local[0].shape[1])
    header = _all_gather(torch.tensor([n, d], dtype=torch.int64, device=comm))
    counts, dims = header[:, 0].tolist(), header[:, 1].tolist()
    if error is not None:
        raise error
    if -1 in counts:
        raise RuntimeError(f"evaluation failed on rank(s) {[r for r, c in enumerate(counts) if c == -1]}")
    dim = max(dims)
    if any(c and di != dim for c, di in zip(counts, dims)):
        raise RuntimeError(f"ranks produced embeddings of different widths: {dims}")
    emb, labels, keys = local
    emb = _all_gather(_pad(emb.reshape(len(emb), dim).to(comm), max(counts)))
    labels = _all_gather(_pad(labels.to(comm), max(counts)))
    all_keys = [None] * len(counts)
    dist.all_gather_object(all_keys, keys)
    if dist.get_rank() != 0:
        return None
    emb = torch.cat([e[:c] for e, c in zip(emb, counts)])
    labels = torch.cat([y[:c] for y, c in zip(labels, counts)])
    return emb, labels, [k for ks in all_keys for k in ks]


def _comm_device(device: torch.device) -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pad(t: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((rows - len(t), *t.shape[1:]))])


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.stack(out)


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


# ---------------------------------------------------------------- standalone CLI


def main(argv=None) -> int:
    """`python -m trainer.evaluate CHECKPOINT --data SPLIT_DIR`; under torchrun every rank embeds a share."""
    import argparse
    from pathlib import Path

    from trainer.errors import USER_ERRORS, report

    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a checkpoint written by the trainer: a step-N/ folder (DCP) or a step-N.pt file")
    p.add_argument("--data", required=True, help="a shard split directory (with manifest.json), e.g. DIR/test")
    p.add_argument("--batch-size", type=int, help="per rank (default: the checkpoint's eval.batch_size)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"], help="auto: bf16 on CUDA")
    p.add_argument("--recall-ks", type=int, nargs="+", help="default: the checkpoint's eval.recall_ks")
    p.add_argument("--no-nmi", action="store_true")
    p.add_argument("--no-map-r", action="store_true")
    p.add_argument("--export", metavar="DIR", help="write keys.npy, embeddings.npy, labels.npy into DIR")
    p.add_argument("--faiss-index", action="store_true", help="with --export: also DIR/index.faiss")
    p.add_argument("--per-class", metavar="FILE", help="write the per-class table (.csv or .parquet)")
    a = p.parse_args(argv)
    if a.faiss_index and not a.export:
        p.error("--faiss-index needs --export DIR")
    if a.recall_ks and min(a.recall_ks) < 1:
        p.error(f"--recall-ks: K must be >= 1, got {a.recall_ks}")
    if a.batch_size is not None and a.batch_size < 1:
        p.error(f"--batch-size: must be >= 1, got {a.batch_size}")
    if a.num_workers < 0:
        p.error(f"--num-workers: must be >= 0, got {a.num_workers}")
    if a.per_class and Path(a.per_class).suffix not in (".csv", ".parquet"):
        p.error(f"--per-class {a.per_class}: the table file must end in .csv or .parquet")
    for folder in ([a.export] if a.export else []) + ([Path(a.per_class).parent] if a.per_class else []):
        try:  # before any work: an output that cannot be written fails now, not after the evaluation
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"cannot create the output folder {folder}: {e.strerror}")

    try:
        return _evaluate_checkpoint(a)
    except USER_ERRORS as e:  # a wrong file or folder: one line, status 2 (tracebacks are for bugs)
        return report(e, int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), quiet_ranks=True)


def _evaluate_checkpoint(a) -> int:
    import json
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from data_shards import TransformConfig, eval_loader, read_manifest
    from trainer import checkpoint, config, distributed
    from trainer.export import export_embeddings, write_table
    from trainer.model import build_model

    state = checkpoint.load(a.checkpoint, check_keys=False, model_only=True)  # a folder: no proxies read
    if not isinstance(state, dict) or not {"config", "model"} <= state.keys():
        raise checkpoint.CheckpointError(f"{a.checkpoint}: not a trainer checkpoint (a dict with 'config' and "
                                         f"'model'); give a step-N/ folder or a step-N.pt of a run's checkpoints")
    try:
        cfg = config.from_dict(state["config"])
    except config.ConfigError as e:
        raise checkpoint.CheckpointError(f"{a.checkpoint}: its config does not validate ({e})") from None
    cfg.model.pretrained, cfg.model.weights_file = False, ""  # the checkpoint has the weights
    manifest = read_manifest(a.data)
    cfg_eval = SimpleNamespace(
        recall_ks=a.recall_ks or list(cfg.eval.recall_ks), nmi=not a.no_nmi and cfg.eval.nmi,
        map_r=not a.no_map_r and cfg.eval.map_r, batch_size=a.batch_size or cfg.eval.batch_size)

    env = distributed.setup(a.device)
    try:
        model = build_model(cfg.model).to(env.device)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            why = lines[1].strip() if len(lines) > 1 else lines[0]
            raise checkpoint.CheckpointError(f"{a.checkpoint}: its weights do not fit the model its own config "
                                             f"describes ({why})") from None
        transform = TransformConfig(**OmegaConf.to_container(cfg.data.transform))
        loader = eval_loader(manifest, batch_size=cfg_eval.batch_size, num_workers=a.num_workers,
                             rank=env.rank, world_size=env.world_size, transform=transform)
        amp = torch.bfloat16 if a.amp == "bf16" or (a.amp == "auto" and env.device.type == "cuda") else None
        result = evaluate(model, loader, device=env.device, cfg_eval=cfg_eval,
                          class_names=manifest.class_names, amp_dtype=amp)
        if result.metrics is not None:
            print(json.dumps({"checkpoint": a.checkpoint, "data": a.data, "samples": len(result.keys),
                              "classes": len(result.per_class), **result.metrics}, indent=1))
            if a.per_class:
                print("per-class table:", write_table(result.per_class, a.per_class))
            if a.export:
                paths = export_embeddings(a.export, result.embeddings, result.keys, result.labels,
                                          faiss_index=a.faiss_index)
                print("export:", " ".join(paths.values()))
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
