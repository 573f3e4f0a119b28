"""python -m data_shards write FORMAT --src PATH --out DIR|s3://...  (data_shards/write.py)
python -m data_shards upload LOCAL_ROOT s3://bucket/prefix  (data_shards/upload.py)

Expected problems (a DataError: missing or unparsable source, a finished output that does not verify, bad
options, a missing bucket, refused credentials; an OSError: the output cannot be written) print one or two lines on
stderr and exit 2; an object store still failing after its retries (StoreUnavailable) prints one line, exit 1.
"""

import argparse
import logging
import sys

from .errors import DataError, StoreUnavailable
from .upload import add_upload_parser, run_upload
from .write import add_write_parser, run_write


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="python -m data_shards", description="ProxyGML dataset shards")
    sub = parser.add_subparsers(dest="command", required=True)
    add_write_parser(sub)
    add_upload_parser(sub)
    args = parser.parse_args(argv)
    try:
        return run_upload(args) if args.command == "upload" else run_write(args)
    except StoreUnavailable as exn:
        print(f"{parser.prog} {args.command}: error: {exn}", file=sys.stderr)
        return 1
    except (DataError, OSError) as exn:
        print(f"{parser.prog} {args.command}: error: {exn}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
