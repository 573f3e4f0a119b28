"""ZeRO 1/2: per-parameter optimizer state out of DeepSpeed's flat partitions and back into new ones (the
engine's rewrap after the warm-up, and the full optimizer state of a DeepSpeed run)."""
from __future__ import annotations

import torch

from collectives import all_reduce_


def zero_optimizer(ds_engine):
    """DeepSpeed's ZeRO 1/2 optimizer wrapper, or None at stage 0 (the torch optimizer is used directly)."""
    opt = ds_engine.optimizer
    return opt if hasattr(opt, "single_partition_of_fp32_groups") else None


def _fragments(zero, i):
    """(param, slice in the flattened param, slice in this rank's flat partition) of group i."""
    for p in zero.bit16_groups[i]:
        m = getattr(p, "_hp_mapping", None)
        if m is None:  # no part of p lives in this rank's partition
            yield p, None, None
            continue
        lp, hp = m.lp_fragment_address, m.hp_fragment_address
        yield p, slice(lp.start, lp.start + lp.numel), slice(hp.start, hp.start + hp.numel)


def export_zero_state(ds_engine) -> dict:
    """Per-parameter optimizer state gathered from the flat partitions of every rank. Collective."""
    zero = zero_optimizer(ds_engine)
    per_param: dict = {}
    steps: dict = {}
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        state = zero.optimizer.state.get(flat, {})
        keys = sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
        if "step" in state:
            steps[i] = state["step"].clone()
        for p, lp, hp in _fragments(zero, i):
            per_param[p] = {}
            for key in keys:
                full = torch.zeros(p.numel(), dtype=torch.float32, device=flat.device)
                if lp is not None:
                    full[lp] = state[key][hp]
                all_reduce_(full, group=zero.real_dp_process_group[i])
                per_param[p][key] = full
    return {"params": per_param, "steps": steps}


def import_zero_state(ds_engine, saved: dict) -> None:
    """Write per-parameter state into the new flat partitions (each rank fills its own slice)."""
    zero = zero_optimizer(ds_engine)
    for i, flat in enumerate(zero.single_partition_of_fp32_groups):
        if i not in saved["steps"]:
            continue  # a group that never stepped (the frozen backbone): the optimizer starts it lazily
        state = {"step": saved["steps"][i]}
        for p, lp, hp in _fragments(zero, i):
            for key, full in saved["params"].get(p, {}).items():
                buf = state.setdefault(key, torch.zeros_like(flat))
                if lp is not None:
                    buf[hp] = full[lp].to(flat)
        zero.optimizer.state[flat] = state
