"""The documents' tables agree with the code: docs/performance.md's settings and their defaults."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from mux.config import MuxConfig
from mux.settings import NodeSettings

DOCS = Path(__file__).resolve().parent.parent / "docs"
_ROW = re.compile(r"^\| `(\[mux\] )?([a-z_]+)` \| ([^|]+) \|", re.MULTILINE)


def _settings_rows() -> list[tuple[type, str, str]]:
    """``(class, field, documented default)`` of each row of the settings table that names a
    field (``[mux] name`` is a MuxConfig field, a bare ``name`` a NodeSettings field)."""
    text = (DOCS / "performance.md").read_text()
    table = text.split("## Settings that change speed or memory", 1)[1].split("\n## ", 1)[0]
    return [(MuxConfig if mux else NodeSettings, name, default.strip()) for mux, name, default in _ROW.findall(table)]


def _value(text: str) -> object:
    if text in ("true", "false"):
        return text == "true"
    return float(text)


def test_the_settings_table_names_fields() -> None:
    rows = _settings_rows()
    assert {(cls, name) for cls, name, _ in rows} >= {
        (MuxConfig, "sign_every"),
        (MuxConfig, "realtime_bulk_rate"),
        (NodeSettings, "writer_idle_s"),
        (NodeSettings, "trim_after_closes"),
    }


@pytest.mark.parametrize(("cls", "name", "documented"), _settings_rows(), ids=lambda v: getattr(v, "__name__", v))
def test_each_documented_default_is_the_code_s(cls: type, name: str, documented: str) -> None:
    fields = {f.name: f for f in attrs.fields(cls)}
    assert name in fields, f"docs/performance.md names {cls.__name__}.{name}, which does not exist"
    assert _value(documented) == fields[name].default, f"{cls.__name__}.{name}: docs say {documented}"


def test_the_documents_link_to_each_other_and_exist() -> None:
    for doc in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([a-z_]+\.md)\)", doc.read_text()):
            assert (DOCS / target).exists(), f"{doc.name} links to {target}, which does not exist"
