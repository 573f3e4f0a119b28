"""pip's package sources on this machine, lent to an image build: `python3 launch/pip_sources.py` prints, one per
line and tab-separated, `mount<TAB>HOST_PATH<TAB>BUILD_PATH` for every local folder or file pip's settings name
(find-links, index-url, extra-index-url, constraint, cert: from `pip config list` and PIP_* variables), and
`arg<TAB>PIP_NAME<TAB>VALUE` with those paths rewritten to their place under /run/pip-build/ (launch/build_image.sh
turns them into `--volume HOST:BUILD:ro` and `--build-arg PIP_NAME=VALUE`). URLs that are not file:// pass as
they are. Standard library only (it runs with the system's python3)."""
from __future__ import annotations

import os
import re
import subprocess

KEYS = ("find-links", "index-url", "extra-index-url", "constraint", "cert")
INSIDE = "/run/pip-build"


def settings() -> dict[str, str]:
    """pip's effective values of KEYS: a PIP_* variable wins over the config files (`pip config list`)."""
    listed = subprocess.run(["pip", "config", "list"], capture_output=True, text=True).stdout
    found: dict[str, str] = {}
    for key, value in re.findall(r"^[^.\n]*\.([\w-]+)='(.*)'$", listed, re.M):
        found.setdefault(key, value)
    for key in KEYS:
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            found[key] = env
    return {k: found[k] for k in KEYS if k in found}


def lent(values: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(host path -> build path, PIP_NAME -> value inside the build)."""
    mounts: dict[str, str] = {}

    def inside(word: str) -> str:
        url = word.startswith("file://")
        path = word[len("file://"):] if url else word
        if not path.startswith("/") or not os.path.exists(path):
            return word
        # a file:// index's packages may lie beside its simple/ folder (../files): lend the index's parent
        root = os.path.dirname(path.rstrip("/")) if path.rstrip("/").endswith("/simple") else path
        mounts.setdefault(root, f"{INSIDE}/{len(mounts)}")
        moved = mounts[root] + path[len(root):]
        return "file://" + moved if url else moved

    args = {"PIP_" + k.upper().replace("-", "_"): " ".join(inside(w) for w in v.split()) for k, v in values.items()}
    return mounts, args


if __name__ == "__main__":
    mounts, args = lent(settings())
    for host, build in mounts.items():
        print(f"mount\t{host}\t{build}")
    for name, value in args.items():
        print(f"arg\t{name}\t{value}")
