"""Fixtures of the dock tests."""

from __future__ import annotations

from types import ModuleType

import pytest


@pytest.fixture
def record_notes(monkeypatch: pytest.MonkeyPatch):
    """``record_notes(module, kinds) -> {kind: [message, ...]}``: the messages ``module``
    sends to napari notifications through its ``show_<kind>`` functions, by kind (they still
    reach napari)."""

    def record(module: ModuleType, kinds: tuple[str, ...]) -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {kind: [] for kind in kinds}
        for kind in kinds:
            real = getattr(module, f"show_{kind}")

            def fake(msg, _kind=kind, _real=real):
                seen[_kind].append(str(msg))
                _real(msg)

            monkeypatch.setattr(module, f"show_{kind}", fake)
        return seen

    return record
