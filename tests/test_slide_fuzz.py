"""Fuzz: seeded mutations of the shared slides open and read, or fail with a SlideError
naming the file; never another exception, a hang or unbounded memory.

The engine is ``benchmarks/slide_fuzz.py`` (cases run in memory-capped worker processes with
a per-case timeout). The default run covers every mutation class and every handmade file;
``-m slow`` runs thousands more.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fuzz(wsi_dir: Path) -> ModuleType:
    pytest.importorskip("pydicom")
    spec = importlib.util.spec_from_file_location(
        "slide_fuzz", REPO / "benchmarks" / "slide_fuzz.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["slide_fuzz"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    assert module.WSI == wsi_dir  # the workers find the slides where the fixtures do
    return module


def _check(fuzz: ModuleType, results: list[dict]) -> None:
    bad = [r for r in results if r["outcome"].startswith("bad")]
    assert not bad, fuzz.summarize(results) + "\n" + "\n".join(map(str, bad[:10]))
    outcomes = {r["outcome"] for r in results}
    # Both allowed outcomes occur: the mutations are neither all harmless nor all fatal.
    assert {"ok", "slide_error"} <= outcomes


def test_fuzz_default_run(fuzz: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> None:
    # One full round of the handmade files: every class gets as many cases.
    n = len(fuzz.CLASSES) * len(fuzz._handmade(fuzz.load_sources(tmp_path_factory.mktemp("c"))))
    results = fuzz.run_fuzz(n, seed=0, cache=tmp_path_factory.mktemp("cache"))
    assert {r["cls"] for r in results} == set(fuzz.CLASSES)
    _check(fuzz, results)


@pytest.mark.slow
def test_fuzz_thousands(fuzz: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> None:
    results = fuzz.run_fuzz(3000, seed=1, workers=2, cache=tmp_path_factory.mktemp("cache"))
    _check(fuzz, results)
