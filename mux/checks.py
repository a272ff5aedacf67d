"""Checks on settings (``attrs`` validators): each refuses a value of the wrong type or out of
range with :class:`~mux.errors.BadSetting`, naming the setting and the value it got.

Used by :class:`~mux.config.MuxConfig`, :class:`~mux.settings.NodeSettings` and
:class:`~mux.intents.BandwidthPolicy`, so a node started with a mistyped or impossible setting
(a TOML file, a ``MUX_*`` variable, a flag, or code) stops at once with one clear line
instead of failing later, or running with a limit nobody meant.
"""

from __future__ import annotations

from typing import Any

import attrs

from .errors import BadSetting

__all__ = ["flag", "instance", "number", "table_of_tables", "text", "url_path", "whole"]


def _refuse(attribute: attrs.Attribute[Any], must: str, value: Any, *, typed: bool = True) -> BadSetting:
    """The error for ``attribute``: "NAME must MUST, not VALUE" (with its type when ``typed``)."""
    kind = "true/false" if isinstance(value, bool) else type(value).__name__
    got = f"{kind} {value!r}" if typed else f"{value!r}"
    return BadSetting(f"{attribute.name} must be {must}, not {got}", setting=attribute.name)


@attrs.frozen
class _Whole:
    minimum: int
    maximum: int | None

    def __call__(self, inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _refuse(attribute, "a whole number", value)
        if value < self.minimum or (self.maximum is not None and value > self.maximum):
            bound = f"at least {self.minimum}" if self.maximum is None else f"{self.minimum} to {self.maximum}"
            raise _refuse(attribute, bound, value, typed=False)


@attrs.frozen
class _Number:
    minimum: float
    above: bool

    def __call__(self, inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _refuse(attribute, "a number", value)
        if value != value or value < self.minimum or (self.above and value == self.minimum):  # NaN fails
            bound = "above" if self.above else "at least"
            raise _refuse(attribute, f"{bound} {self.minimum:g}", value, typed=False)


def whole(minimum: int = 0, maximum: int | None = None) -> Any:
    """An ``int`` (not a bool) from ``minimum`` to ``maximum`` (no upper bound: None)."""
    return _Whole(minimum, maximum)


def number(minimum: float = 0.0, *, above: bool = False) -> Any:
    """An ``int`` or ``float`` (not a bool, not NaN) of at least ``minimum``, or with
    ``above`` greater than it."""
    return _Number(minimum, above)


def flag(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """``True`` or ``False``."""
    if not isinstance(value, bool):
        raise _refuse(attribute, "true or false", value)


def text(optional: bool = False) -> Any:
    """A ``str`` (or with ``optional`` also None: unset)."""

    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not (isinstance(value, str) or (optional and value is None)):
            raise _refuse(attribute, "text", value)

    return check


def instance(kind: type, what: str) -> Any:
    """An instance of ``kind``, described to the user as ``what``."""

    def check(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, kind):
            raise _refuse(attribute, what, value)

    return check


def url_path(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A URL path: text that starts with ``/``."""
    if not (isinstance(value, str) and value.startswith("/")):
        raise _refuse(attribute, "a path that starts with /", value)


def table_of_tables(inst: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    """A ``dict`` of names to ``dict``s (TOML: ``[SECTION.NAME]`` tables)."""
    if not isinstance(value, dict):
        raise _refuse(attribute, "a table of tables", value)
    for name, inner in value.items():
        if not isinstance(name, str) or not isinstance(inner, dict):
            raise _refuse(attribute, f"a table of tables ({name!r} is not a table)", inner)
