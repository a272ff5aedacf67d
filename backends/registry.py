"""Backend registry: names -> factories, from code and from ``mux.backends`` entry points."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from .base import BackendFactory

__all__ = ["ENTRY_POINT_GROUP", "available_backends", "get_backend_factory", "register_backend"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mux.backends"
_FACTORIES: dict[str, BackendFactory] = {}
_entry_points_loaded = False


def register_backend(name: str, factory: BackendFactory) -> None:
    """Register ``factory`` (called with the Mux, returns a Backend) under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError("backend name must be a non-empty string")
    _FACTORIES[name] = factory


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _FACTORIES:
            continue
        try:
            _FACTORIES[ep.name] = ep.load()
        except Exception:  # a broken third-party package must not stop the node
            log.exception("could not load backend entry point %s", ep.value)


def get_backend_factory(name: str) -> BackendFactory | None:
    """The factory registered under ``name`` (code first, then entry points), or None."""
    _load_entry_points()
    return _FACTORIES.get(name)


def available_backends() -> list[str]:
    """Names of every backend that can be instantiated."""
    _load_entry_points()
    return sorted(_FACTORIES)
