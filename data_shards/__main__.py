"""python -m data_shards write {cub200,cars196,sop,folder} --src PATH --out DIR  (see data_shards/write.py)

Expected problems (a DataError: missing or unparsable source, a finished output that does not verify, bad
options; an OSError: the output cannot be written) print one or two lines on stderr and exit 2.
"""

import argparse
import logging
import sys

from .errors import DataError
from .write import add_write_parser, run_write


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m data_shards", description="ProxyGML dataset shards")
    sub = parser.add_subparsers(dest="command", required=True)
    add_write_parser(sub)
    args = parser.parse_args(argv)
    try:
        return run_write(args)
    except (DataError, OSError) as exn:
        print(f"{parser.prog} {args.command}: error: {exn}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
