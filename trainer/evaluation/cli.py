"""The standalone evaluation CLI: `python -m trainer.evaluate CHECKPOINT --data SHARDS_SPLIT_DIR` (also
`python -m trainer.evaluation`); under torchrun every rank embeds a share. Prints the metrics as JSON, optionally
writes the per-class table and an export (keys + vectors, faiss index)."""

from __future__ import annotations

import os
from typing import cast

from trainer.config import CHOICES, amp_dtype
from trainer.evaluation.evaluate import evaluate

DESCRIPTION = "Distributed evaluation: every rank embeds its share of the test stream, rank 0 gathers and scores."


def main(argv=None) -> int:
    """`python -m trainer.evaluate CHECKPOINT --data SPLIT_DIR`; under torchrun every rank embeds a share."""
    import argparse
    from pathlib import Path

    from trainer.errors import USER_ERRORS, report

    p = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=DESCRIPTION)
    p.add_argument("checkpoint", help="a checkpoint written by the trainer: a step-N/ folder (DCP) or a step-N.pt file")
    p.add_argument("--data", required=True, help="a shard split directory (with manifest.json), e.g. DIR/test")
    p.add_argument("--batch-size", type=int, help="per rank (default: the checkpoint's eval.batch_size)")
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--amp", default="auto", choices=CHOICES["train.amp"], help="auto: bf16 on CUDA")
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

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        return _evaluate_checkpoint(a)
    except USER_ERRORS as e:  # a wrong file or folder: one line, status 2 (tracebacks are for bugs)
        return report(e, rank, world_size, quiet_ranks=True)
    except Exception as e:  # noqa: BLE001 - another rank failed first (one line), or a bug (its traceback)
        from trainer.errors import exit_now
        exit_now(report(e, rank, world_size))  # no teardown: it could wait on a peer that is gone


def trained_on(state: dict, class_names) -> int:
    """How many of `class_names` the checkpoint trained on: from its list of train class names, or, for older
    checkpoints that keep only their digest, all of them when the digest matches (else 0)."""
    names = [str(c) for c in class_names]
    trained = state.get("train_class_list")
    if trained:
        return len(set(names) & {str(c) for c in trained})
    from trainer.resume import class_digest
    return len(names) if state.get("train_class_names") == class_digest(names) else 0


class _Failing:
    """A loader whose iteration raises the error its making met (so that evaluate() shares it with the ranks)."""

    def __init__(self, error: BaseException):
        self.error = error

    def __iter__(self):
        raise self.error


def _evaluate_checkpoint(a) -> int:
    import json

    from omegaconf import OmegaConf

    from data_shards import TransformConfig, eval_loader, read_manifest
    from trainer import checkpoint, config, distributed
    from trainer.errors import USER_ERRORS
    from trainer.evaluation.export import export_embeddings, write_table
    from trainer.model import build_model
    from trainer.redact import redact

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
    overlap = trained_on(state, manifest.class_names)
    if overlap and int(os.environ.get("RANK", 0)) == 0:
        import sys
        print(redact(f"warning: {overlap} of the {manifest.num_classes} classes of {a.data} are classes "
                     f"{a.checkpoint} trained on: the metrics measure how well it learnt them, not retrieval of "
                     f"unseen classes; evaluate on the test split (classes it never saw) for that"), file=sys.stderr)
    recall_ks = a.recall_ks or list(cfg.eval.recall_ks)
    nmi, map_r = not a.no_nmi and cfg.eval.nmi, not a.no_map_r and cfg.eval.map_r
    batch_size = a.batch_size or cfg.eval.batch_size

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
        transform = TransformConfig(**cast(dict, OmegaConf.to_container(cfg.data.transform)))
        try:
            loader = eval_loader(manifest, batch_size=batch_size, num_workers=a.num_workers,
                                 rank=env.rank, world_size=env.world_size, transform=transform)
        except USER_ERRORS as e:  # this rank's share is damaged: raised inside evaluate(), which tells every rank
            loader = _Failing(e)
        amp = amp_dtype(a.amp, env.device)  # the one mixed-precision rule (train.amp), as in training
        result = evaluate(model, loader, device=env.device, recall_ks=recall_ks, nmi=nmi, map_r=map_r,
                          class_names=manifest.class_names, amp_dtype=amp)
        if result.metrics is not None:
            classes = 0 if result.per_class is None else len(result.per_class)
            print(json.dumps({"checkpoint": redact(a.checkpoint), "data": redact(a.data),
                              "samples": len(result.keys or []), "classes": classes, **result.metrics}, indent=1))
            if a.per_class:
                print("per-class table:", write_table(result.per_class, a.per_class))
            if a.export:
                paths = export_embeddings(a.export, result.embeddings, result.keys, result.labels,
                                          faiss_index=a.faiss_index)
                print("export:", " ".join(paths.values()))
    finally:
        distributed.teardown()
    return 0

