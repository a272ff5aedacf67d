"""The public API is exactly what ``__all__`` says, and complete."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import backends
import mux

REQUIRED = {
    "open_mux",
    "Mux",
    "Channel",
    "Frame",
    "Intent",
    "BandwidthPolicy",
    "resolve_intent",
    "INTENT_ROUTES",
    "BANDWIDTH_POLICIES",
    "ChannelError",
    "ChannelThrottled",
    "verify_frame",
    "verify_chain",
}


def test_required_names_exported() -> None:
    assert REQUIRED <= set(mux.__all__)


def _modules() -> list[str]:
    names = []
    for pkg in (mux, backends):
        names.append(pkg.__name__)
        names += [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if m.name != "__main__"]
    return names


@pytest.mark.parametrize("name", _modules())
def test_all_is_complete_and_documented(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no docstring"
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    for attr in exported:
        obj = getattr(module, attr)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert getattr(obj, "__doc__", None), f"{name}.{attr} has no docstring"
