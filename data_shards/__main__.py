"""python -m data_shards write {cub200,cars196,sop,folder} --src PATH --out DIR  (see data_shards/write.py)"""

import argparse
import logging
import sys

from .write import add_write_parser, run_write


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m data_shards", description="ProxyGML dataset shards")
    sub = parser.add_subparsers(dest="command", required=True)
    add_write_parser(sub)
    args = parser.parse_args(argv)
    return run_write(args)


if __name__ == "__main__":
    sys.exit(main())
