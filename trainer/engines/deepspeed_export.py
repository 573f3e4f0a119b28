"""A DeepSpeed checkpoint -> a plain state dict (embedder, criterion) for evaluation and export, and its CLI:

    python -m trainer.deepspeed_engine export DS_DIR OUT.pt [--tag step-NNNNNNNNN] [--trainer-checkpoint PATH]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def consolidated_state_dict(ds_dir: str, tag: str | None = None) -> dict:
    """The TrainModule's full fp32 state dict from a DeepSpeed checkpoint (any of ZeRO 0, 1, 2)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    if tag is None:
        with open(os.path.join(ds_dir, "latest")) as f:
            tag = f.read().strip()
    folder = os.path.join(ds_dir, tag)
    from trainer.safe_load import check_torch_files, torch_load
    check_torch_files(folder)  # DeepSpeed's reader unpickles in full: refuse a file that would run code first
    if any(f.endswith("optim_states.pt") and "zero_pp_rank" in f for f in os.listdir(folder)):
        sd = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=tag)
    else:  # stage 0: the module states file holds the whole fp32 module
        sd = torch_load(os.path.join(folder, "mp_rank_00_model_states.pt"))["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def split_state_dict(sd: dict) -> tuple[dict, dict]:
    """TrainModule keys -> (embedder state dict, criterion state dict), the trainer checkpoint's entries."""
    model = {k.removeprefix("embedder."): v for k, v in sd.items() if k.startswith("embedder.")}
    crit = {k.removeprefix("criterion."): v for k, v in sd.items() if k.startswith("criterion.")}
    return model, crit


def export(ds_dir: str, out: str, tag: str | None = None, trainer_checkpoint: str | None = None) -> str:
    """Write a plain checkpoint dict (model, criterion; config etc. from `trainer_checkpoint` if given)."""
    model, crit = split_state_dict(consolidated_state_dict(ds_dir, tag))
    state = {}
    if trainer_checkpoint:
        from trainer.checkpoint import load
        state = load(trainer_checkpoint, check_keys=False, model_only=True)  # a .pt file or a DCP folder
        state.pop("optimizer", None)
    state.update(model=model, criterion=crit)
    torch.save(state, out)
    return out


def main(argv=None) -> int:
    """The CLI; returns the exit status: 0, or 2 with one line on stderr when a given path does not exist."""
    p = argparse.ArgumentParser(prog="python -m trainer.deepspeed_engine",
                                description="DeepSpeed checkpoint -> plain state dict for evaluation/export")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("ds_dir", help="<checkpoint dir>/deepspeed (holds step-* folders and 'latest')")
    e.add_argument("out", help="output .pt: {'model': embedder state dict, 'criterion': ...}")
    e.add_argument("--tag", default=None, help="step-NNNNNNNNN (default: the one named in 'latest')")
    e.add_argument("--trainer-checkpoint", default=None,
                   help="the trainer's step-N.pt or step-N/ folder: its config, epoch, step ... are copied over")
    a = p.parse_args(argv)
    from trainer.errors import USER_ERRORS
    try:
        print(export(a.ds_dir, a.out, a.tag, a.trainer_checkpoint))
    except USER_ERRORS as e:  # a file that would run code, a damaged trainer checkpoint: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}; give the <checkpoint dir>/deepspeed folder of a run trained with engine.name=deepspeed",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
