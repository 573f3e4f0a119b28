"""The configuration reference, generated from the schema itself (trainer/config.py, and data.transform's
TransformConfig in data_shards/transforms.py): every key, its type, default, allowed values and the comment
written beside it. The documentation site builds its "Configuration reference" page from this at build time
(docs/_hooks/config_reference.py), so the page cannot disagree with the code.

    python -m trainer.config_reference > configuration.md     # the same page, by hand
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import MISSING

from omegaconf import MISSING as OMEGA_MISSING

from data_shards.transforms import TransformConfig
from trainer.config import schema

TITLE = "Configuration reference"


@dataclasses.dataclass
class Key:
    key: str          # dotted, e.g. "loss.mode"
    type: str         # e.g. "str", "list[int]"
    default: str      # as YAML would write it; "(required)" when the schema has none
    allowed: str      # e.g. "gather | local | sharded", "> 0", "" when any value of the type goes
    comment: str      # the comment beside the field in the schema, "" when there is none


def _class_comments(cls: type) -> dict[str, str]:
    """{field name: comment} from the class's source: the comment on the field's line, the comment lines just
    above it (since the previous field), and the lines that continue the previous field's comment (a `#`
    followed by a run of spaces, aligned under it) go with the previous field. A class made at run time (the
    schema's `Config` and `LossConfig`, trainer.config.schema()) has no source: no comments of its own."""
    try:
        lines, first = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    source = textwrap.dedent("".join(lines))
    body = typing.cast(ast.ClassDef, ast.parse(source).body[0]).body
    text = source.splitlines()
    out: dict[str, list[str]] = {}
    previous: str | None = None
    cursor = 1  # first line after the class statement (0-based index into text)
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        name = node.target.id
        above = []
        for line in text[cursor:node.lineno - 1]:
            stripped = line.strip()
            if not stripped.startswith("#"):
                continue
            content = stripped[1:]
            if previous is not None and content.startswith("   "):  # a continuation of the previous comment
                out[previous].append(content.strip())
            else:
                above.append(content.strip())
        own = text[node.lineno - 1]
        trailing = own.split("  # ", 1)[1].strip() if "  # " in own else ""
        out[name] = [*above, *([trailing] if trailing else [])]
        previous, cursor = name, typing.cast(int, node.end_lineno)
    return {k: " ".join(v) for k, v in out.items()}


def _transform_checks() -> dict[str, str]:
    """{field: the condition TransformConfig.__post_init__ checks}, as written there (without `self.`)."""
    source = textwrap.dedent(inspect.getsource(TransformConfig.__post_init__))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) for k in node.keys):
            return {str(typing.cast(ast.Constant, k).value):
                    _with_values(typing.cast(str, ast.get_source_segment(source, v)).replace("self.", ""))
                    for k, v in zip(node.keys, node.values)}
    return {}


def _with_values(condition: str) -> str:
    """A condition with the module constants it names (e.g. INTERPOLATIONS) replaced by their values."""
    import data_shards.transforms as module

    for name, value in vars(module).items():
        if name.isupper() and name in condition and isinstance(value, (dict, tuple, list, set, frozenset)):
            condition = condition.replace(name, "(" + ", ".join(repr(v) for v in sorted(value)) + ")")
    return condition


def _type_name(kind) -> str:
    if isinstance(kind, type) and not typing.get_args(kind):
        return kind.__name__
    return str(kind).replace("typing.", "")


def _default(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        value = f.default
    elif f.default_factory is not MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    if value is OMEGA_MISSING or value == "???":
        return "(required)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _allowed(meta: dict) -> str:
    if "choices" in meta:
        return " | ".join(str(c) for c in meta["choices"])
    parts = []
    if "low" in meta:
        parts.append(f"{'>' if meta.get('low_open') else '>='} {meta['low']:g}")
    if "high" in meta:
        parts.append(f"<= {meta['high']:g}")
    return ", ".join(parts)


def schema_keys(cls: type | None = None, prefix: str = "") -> list[Key]:
    """Every key of the schema (by default the whole config, with the registered loss families' sections), in
    declaration order (sections first to last)."""
    cls = cls or schema()
    hints = typing.get_type_hints(cls)
    comments = {}  # a subclass's comments over its bases' (data.transform: TransformKeys over TransformConfig)
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        comments.update(_class_comments(base))
    checks = _transform_checks() if issubclass(cls, TransformConfig) else {}
    out = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        key = f"{prefix}{f.name}"
        if isinstance(kind, type) and dataclasses.is_dataclass(kind):
            out.extend(schema_keys(kind, key + "."))
            continue
        allowed = _allowed(dict(f.metadata)) or (f"`{checks[f.name]}`" if f.name in checks else "")
        out.append(Key(key, _type_name(kind), _default(f), allowed, comments.get(f.name, "")))
    return out


def _cell(text: str) -> str:
    """Table-cell text: pipes escaped, angle brackets as entities (`<root>` is not an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;") if text else ""


def markdown() -> str:
    """The reference page: one table per section, the keys in the schema's order."""
    keys = schema_keys()
    lines = [f"# {TITLE}", "",
             "Generated from the schema (`trainer/config.py`; `data.transform` from `data_shards/transforms.py`, "
             "each loss family's section `loss.<family>` from its file in `loss/`) "
             "each time the site is built: every key, its type, default, allowed values and the comment beside "
             "it in the code. Presets (`trainer/configs/*.yaml`) set some of them; `key=value` on the command "
             "line sets any (`python -m trainer --config cub200 train.epochs=10 loss.mode=local`). "
             "`python -m trainer --config NAME --print-config` shows a preset resolved.", ""]
    section = None
    for k in keys:
        top = k.key.split(".")[0]
        if top != section:
            section = top
            lines += ["", f"## {section}", "", "| key | type | default | allowed | what it is |",
                      "| --- | --- | --- | --- | --- |"]
        default = f"`{k.default}`" if k.default != "(required)" else "*(required)*"
        allowed = k.allowed if k.allowed.startswith("`") else _cell(k.allowed)
        lines.append(f"| `{k.key}` | {_cell(k.type)} | {default} | {allowed} | {_cell(k.comment)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
