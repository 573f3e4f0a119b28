"""Loss families: each family owns its config section, its checks, its criterion in every distributed mode, the
keys a resume may not change and its one-line description, and registers itself once (loss/__init__.py).

    register_family(ProxyGMLFamily())          # one line per family
    family = get_family(cfg.loss.family)       # the build step, the config check, resume, the run summary
    criterion = family.build(cfg.loss[family.name], cfg.loss.mode, num_classes, dim, seed=cfg.run.seed)

The run's config holds `loss: {family, mode, <one section per registered family>}` (trainer/config.py builds the
schema from this registry); only the section of `loss.family` is used. A section is a dataclass whose fields
declare their allowed values with the helpers below (`one_of`, `positive`, `non_negative`, `in_range`), which the
config check reads; anything more a family checks in `validate`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from registry import Registry

MODES = ("local", "gather", "sharded")  # the distributed modes a family may offer (loss/distributed.py)


# ----------------------------------------------------------------------------- allowed values, beside each field
# A field's allowed values are written where it is declared; the config check reads them from the schema.

def one_of(default: str, *others: str, among: tuple = ()) -> Any:
    """A string field whose value must be `default`, one of `others`, or one of `among`."""
    allowed = tuple(among) or (default, *others)
    assert default in allowed
    return field(default=default, metadata={"choices": allowed})


def positive(default: float) -> Any:
    """A number that must be > 0."""
    return field(default=default, metadata={"low": 0, "low_open": True})


def non_negative(default: float) -> Any:
    """A number that must be >= 0."""
    return field(default=default, metadata={"low": 0, "low_open": False})


def in_range(default: float, low: float, high: float) -> Any:
    """A number in (low, high]."""
    return field(default=default, metadata={"low": low, "low_open": True, "high": high})


@dataclass(frozen=True)
class LossContext:
    """What a family's check may need from the rest of the config: model.dim, data.sampler, data.m_per_class."""
    dim: int
    sampler: str
    m_per_class: int


class LossFamily(ABC):
    """One family of losses. Subclasses set the class attributes and implement `build` and `describe`.

    - `name`: the value of `loss.family` and the name of its config section (`loss.<name>`).
    - `section`: the section's dataclass (plain fields with defaults; allowed values declared with the helpers).
    - `modes`: the `loss.mode` values the family builds (a subset of MODES, the default `gather` first or among).
    - `fixed_keys`: {field of the section: why a resume may not change it} (trainer/resume.py refuses it).
    """

    name: ClassVar[str]
    section: ClassVar[type]
    modes: ClassVar[tuple[str, ...]] = ("gather", "local")
    fixed_keys: ClassVar[dict[str, str]] = {}

    @abstractmethod
    def build(self, section: Any, mode: str, num_classes: int, dim: int, *, seed: int = 0) -> Any:
        """The criterion (loss/criterion.py's contract) for `mode` on the current process group. `section` is the
        family's config section (an omegaconf node or the dataclass); `seed` fixes any initial weights."""

    @abstractmethod
    def describe(self, section: Any, mode: str) -> str:
        """One line for the run summary, e.g. "ProxyGML (gather, 1 proxies/class, r 0.05, lam 0.3)"."""

    def validate(self, section: Any, mode: str, context: LossContext) -> None:
        """Checks beyond the declared field rules; raise ValueError whose message starts with the dotted key
        (`loss.<name>.<field>: ...`). The default checks nothing more."""
        return None

    def layout(self, mode: str) -> str:
        """The checkpoint layout of `mode`: "replicated" (every rank holds the whole state) or "sharded" (each rank
        its block, declared by the criterion's `sharded_rows()`). A resume may not cross layouts."""
        return "replicated"

    def defaults(self) -> dict:
        """The section's default values, {field: value}."""
        return {f.name: getattr(self.section(), f.name) for f in fields(self.section)}


_FAMILIES: Registry[LossFamily] = Registry("loss family")


def register_family(family: LossFamily) -> LossFamily:
    """Make `family` a choice of `loss.family` (and its section part of the config schema). Raises ValueError when
    the name is taken by another family or is not a plain identifier, or when its modes are not among MODES."""
    name = family.name
    if not name.isidentifier() or name in ("family", "mode"):
        raise ValueError(f"loss family name {name!r}: must be an identifier other than 'family' and 'mode'")
    if not family.modes or set(family.modes) - set(MODES):
        raise ValueError(f"loss family {name!r}: modes {family.modes} must be among {MODES}")
    return _FAMILIES.add(name, family)


def unregister_family(name: str) -> None:
    """Remove family `name` (tests that register a toy family clean up with this)."""
    _FAMILIES.remove(name)


def families() -> dict[str, LossFamily]:
    """The registered families, {name: family}, in registration order."""
    return _FAMILIES.as_dict()


def get_family(name: str) -> LossFamily:
    """The family registered as `name`; ValueError naming `loss.family` and the choices otherwise."""
    return _FAMILIES.get(name, "loss.family")
