"""python -m trainer [--config FILE|PRESET] [key=value ...]   (also under torchrun: one process per device)

Without --config the demo preset runs (scikit-learn digits, CPU, < 2 min). Presets: trainer/configs/*.yaml.
Exit status: 0 done (or stopped by SIGTERM/SIGUSR1 with a checkpoint), 2 a user error (one line on stderr:
the config, the data, the run directory, a checkpoint, the disk), 1 a bug (traceback) or another rank failed.
Whatever fails, the process ends at once with its loader workers, so torchrun sees it and restarts or stops.
Under torchrun, a launcher that dies (even by SIGKILL) sends its trainers SIGTERM: they checkpoint and exit.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

# The project's modules (and torch under them) are imported inside main(): `--help` answers at once.
QUIET_RANK_DELAY_S = 3.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="YAML file or preset name (cub200, cars196, sop, omniglot, folder, demo); default: demo")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # DeepSpeed's launcher appends --local_rank unless given --no_local_rank; LOCAL_RANK comes from the env
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=10 loss.mode=local")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Train; returns the exit status. A failure returns its status with the loader workers already killed
    and the process group left as it is (peers may be gone): the caller exits at once (see `__main__`)."""
    args = parse_args(argv)
    from trainer.config import DEFAULT_CONFIG, ConfigError, load_config
    from trainer.config_legacy import as_written
    from trainer.errors import report
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    aliases: dict[str, str] = {}  # keys written in the loss section's old spelling
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides, aliases)
    except ConfigError as e:  # every rank has the same one: rank 0 says it
        return _let_rank0_speak(report(e, rank, world_size, quiet_ranks=True), rank)
    if args.print_config:
        from trainer.config import to_yaml
        print(to_yaml(cfg), end="")
        return 0
    from trainer import distributed
    from trainer.build import train
    from trainer.errors import StalledPeer, is_collective_timeout, stop_with_launcher
    stop_with_launcher()
    try:
        env = distributed.setup(cfg.run.device, backend=cfg.run.dist_backend,
                                timeout_s=cfg.run.collective_timeout_s)
        train(cfg, env)
    except BaseException as e:  # noqa: BLE001 - every failure ends the same way: told, non-zero, at once
        if isinstance(e, ConfigError) and aliases:  # e.g. a resume's check names a key written in the old spelling
            e = ConfigError(as_written(str(e), aliases))
        quiet = isinstance(e, ConfigError) or getattr(e, "same_on_every_rank", False)
        if world_size > 1 and is_collective_timeout(e):  # a peer stopped answering: name it
            e = StalledPeer(distributed.describe_stall(cfg.run.collective_timeout_s))
        code = report(e, rank, world_size, quiet_ranks=quiet)
        from trainer.errors import kill_children
        kill_children()
        if quiet:
            _let_rank0_speak(code, rank)
        if world_size == 1:
            distributed.teardown()
        return code
    distributed.teardown()
    return 0


def _let_rank0_speak(code: int, rank: int) -> int:
    """An error every rank has is printed by rank 0 alone; the other ranks wait a moment before they exit, so that
    torchrun, which stops the whole group at the first exit it sees, does not stop rank 0 before it has said it."""
    if rank != 0 and code:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a launcher that stops us meanwhile still sees the status
        time.sleep(QUIET_RANK_DELAY_S)
    return code


if __name__ == "__main__":
    status = main()
    if status:
        from trainer.errors import exit_now
        exit_now(status)  # no interpreter teardown: it could wait on a dead peer or a stuck worker
    sys.exit(0)
