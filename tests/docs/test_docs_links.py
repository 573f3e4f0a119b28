"""The README's links lead to files that exist, and the site's navigation lists every page in docs/ (the generated
configuration reference included), so a page added or renamed is not lost. `mkdocs build --strict` (CI) checks
the links inside the site."""
import os
import re

import yaml

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for v in node.values() for p in nav_pages(v)]
    return [p for v in node for p in nav_pages(v)]


def test_readme_links_exist():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    links = [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t]
    assert links, "the README links into the documentation"
    for target in links:
        assert os.path.exists(os.path.join(ROOT, target)), target


def test_the_navigation_lists_every_page():
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
        site = yaml.load(f, Loader=yaml.SafeLoader)  # no !!python tags in it
    pages = set(nav_pages(site["nav"]))
    docs = os.path.join(ROOT, site["docs_dir"])
    on_disk = {os.path.relpath(os.path.join(d, f), docs) for d, _, files in os.walk(docs) for f in files
               if f.endswith(".md") and "_hooks" not in d}
    assert on_disk | {"configuration.md"} == pages, (pages ^ (on_disk | {"configuration.md"}))
