"""mkdocs hook: the page configuration.md is generated from the config schema at every build
(trainer/config_reference.py), so the reference cannot go stale; no copy of it is kept in the repository."""
import os
import sys

from mkdocs.structure.files import File

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PAGE = "configuration.md"


def on_files(files, config):
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from trainer.config_reference import markdown

    files.append(File.generated(config, PAGE, content=markdown()))
    return files
