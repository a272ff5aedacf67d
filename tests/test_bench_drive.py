"""The callgrind section's driver (``python -m tests.bench instructions``, not in the default
bench run) still relays through the sessions it counts: each configuration, a few sends."""

from __future__ import annotations

import pytest

from tests.bench.instructions import CONFIGS, drive


@pytest.mark.parametrize(("label", "sign_every", "acks", "sign"), CONFIGS)
async def test_drive_relays_each_configuration(label: str, sign_every: int, acks: bool, sign: bool) -> None:
    await drive(40, sign_every, acks, sign)
