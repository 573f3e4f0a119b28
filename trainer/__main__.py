"""python -m trainer [--config FILE|PRESET] [key=value ...]   (also under torchrun: one process per device)

Without --config the demo preset runs (scikit-learn digits, CPU, < 2 min). Presets: trainer/configs/*.yaml.
"""
from __future__ import annotations

import argparse
import sys

from trainer.config import DEFAULT_CONFIG, ConfigError, load_config


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
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from trainer.config import to_yaml
        print(to_yaml(cfg), end="")
        return 0
    from trainer import distributed
    from trainer.loop import train
    env = distributed.setup(cfg.run.device, backend=cfg.run.dist_backend)
    try:
        train(cfg, env)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
