"""DeepSpeed's environment for the trainer: it adopts the trainer's process group (no MPI discovery, no second
init), keeps its INFO lines and a torch deprecation warning quiet, and skips the CPU shm-comm JIT build."""
from __future__ import annotations

import logging
import warnings

import torch.distributed as dist


def skip_cpu_shm_comm_build() -> bool:
    """On the CPU accelerator, stop DeepSpeed from JIT-compiling `deepspeed_shm_comm` (~30 s of g++).

    DeepSpeed's TorchBackend loads that op whenever it starts, even on a process group that already exists,
    but only its inference all-reduce uses it; training collectives go through torch.distributed (gloo).
    When the op was prebuilt at install time (DS_BUILD_SHM_COMM=1) it loads instantly and is kept.
    Returns True when the build was skipped.
    """
    from deepspeed.accelerator import get_accelerator
    if get_accelerator().device_name() != "cpu":
        return False
    from deepspeed.git_version_info import installed_ops
    if installed_ops.get("deepspeed_shm_comm", False):
        return False
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the dict DeepSpeed consults before a build
    return True


def adopt_process_group() -> None:
    """Hand the existing torch.distributed group to DeepSpeed (no MPI discovery, no second init)."""
    if not dist.is_initialized():
        raise RuntimeError("engine=deepspeed: the process group must exist first (trainer.distributed.setup())")
    import deepspeed
    import deepspeed.comm
    from deepspeed.utils import logger
    if deepspeed.comm.is_initialized():
        return
    # ZeRO calls all_gather_into_tensor, which torch 2.14 flags as deprecated once per rank: not the user's to fix
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    if logger.level < logging.WARNING:
        logger.setLevel(logging.WARNING)  # DeepSpeed's INFO lines would bury the progress bar and loss lines
    skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False,
                               dist_init_required=False)
