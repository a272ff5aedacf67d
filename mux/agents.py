"""Agent names: normalized as in the seed (lower case, ``.aint`` stripped) and validated."""

from __future__ import annotations

import re

from .errors import BadRequest

__all__ = ["normalize_agent"]

_AGENT_RE = re.compile(r"^[a-z0-9][a-z0-9._@+\-]{0,127}$")


def normalize_agent(name: object) -> str:
    """``"Gemini.aint"`` -> ``"gemini"``; raise BadRequest for anything not a sane name."""
    if not isinstance(name, str):
        raise BadRequest("agent name must be a string", code="bad_agent")
    norm = name.strip().lower()
    if norm.endswith(".aint"):
        norm = norm[: -len(".aint")]
    if not _AGENT_RE.match(norm):
        raise BadRequest(
            f"bad agent name {name!r}: use 1-128 of a-z 0-9 . _ @ + - (starting with a letter or digit)",
            code="bad_agent",
        )
    return norm
