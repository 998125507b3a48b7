"""The light modules stay light: no torch, no Qt, no napari, no optional backends on import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "PyQt5", "PyQt6", "PySide2", "PySide6", "qtpy")


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "code",
    [
        "import histolens",
        "import histolens.slide",
        "import histolens.region",
        "import histolens._reader",
        "import histolens._sample_data",
        "import histolens.nuclei, histolens.models.probe",
        "import histolens.training.cli, histolens.training.config",  # `histolens train --help`
    ],
)
def test_no_torch_or_qt(code: str) -> None:
    loaded = _modules_after(code)
    leaked = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not leaked, f"`{code}` imported {leaked}"


def test_training_help_stays_light() -> None:
    """`histolens train --help` loads no table library either (it once came in with a default)."""
    loaded = _modules_after("import histolens.training.cli")
    assert "pandas" not in loaded


def test_slide_defers_napari_and_optional_backends() -> None:
    loaded = _modules_after("import histolens.slide, histolens._reader")
    for name in ("napari", "openslide", "wsidicom", "pydicom", "histolens.export"):
        assert name not in loaded, f"{name} is imported eagerly"
