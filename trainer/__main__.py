"""python -m trainer [--config FILE|PRESET] [key=value ...]   (also under torchrun: one process per device)

Without --config the demo preset runs (scikit-learn digits, CPU, < 2 min). Presets: trainer/configs/*.yaml.
Exit status: 0 done (or stopped by SIGTERM/SIGUSR1 with a checkpoint), 2 a user error (one line on stderr:
the config, the data, the run directory, a checkpoint, the disk), 1 a bug (traceback) or another rank failed.
Whatever fails, the process ends at once with its loader workers, so torchrun sees it and restarts or stops.
"""
from __future__ import annotations

import argparse
import os
import sys

from trainer.config import DEFAULT_CONFIG, ConfigError, load_config
from trainer.errors import exit_now, report


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="YAML file or preset name (cub200, cars196, sop, omniglot, demo); default: demo")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # DeepSpeed's launcher appends --local_rank unless given --no_local_rank; LOCAL_RANK comes from the env
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=10 loss.mode=local")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Train; returns the exit status. A failure returns its status with the loader workers already killed
    and the process group left as it is (peers may be gone): the caller exits at once (see `__main__`)."""
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:  # every rank has the same one: rank 0 says it
        return report(e, rank, world_size, quiet_ranks=True)
    if args.print_config:
        from trainer.config import to_yaml
        print(to_yaml(cfg), end="")
        return 0
    from trainer import distributed
    from trainer.loop import train
    try:
        env = distributed.setup(cfg.run.device, backend=cfg.run.dist_backend)
        train(cfg, env)
    except BaseException as e:  # noqa: BLE001 - every failure ends the same way: told, non-zero, at once
        code = report(e, rank, world_size, quiet_ranks=isinstance(e, ConfigError))
        from trainer.errors import kill_children
        kill_children()
        if world_size == 1:
            distributed.teardown()
        return code
    distributed.teardown()
    return 0


if __name__ == "__main__":
    status = main()
    if status:
        exit_now(status)  # no interpreter teardown: it could wait on a dead peer or a stuck worker
    sys.exit(0)
