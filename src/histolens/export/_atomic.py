"""Atomic writes: a temporary beside the target, moved onto it only when the writer succeeded.

So a failed or cancelled export never leaves a half-written file where a good one was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from histolens.region import Region

__all__ = ["atomic_path", "json_default", "save_json"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    Works for files and for folders (OME-Zarr). On any exception (including
    ``KeyboardInterrupt``) the temporary is deleted and an existing ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so os.replace is a rename on one filesystem (atomic for files).
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the writer creates it (as a file or a folder)
    try:
        yield tmp
        if tmp.is_dir():
            _replace_dir(tmp, target)
        else:
            if not tmp.exists():
                msg = f"the writer for {target} produced nothing at {tmp}"
                raise RuntimeError(msg)
            os.replace(tmp, target)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _replace_dir(tmp: Path, target: Path) -> None:
    # Folders cannot be swapped atomically; move the old one aside first so the target
    # name always points at a complete store (old or new), never a mixture.
    if target.exists():
        old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def json_default(value: Any) -> Any:
    """JSON for numpy scalars/arrays, paths, regions, sets and dataclasses in model cards."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (Path, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, Region):
        return {"y0": value.y0, "x0": value.x0, "y1": value.y1, "x1": value.x1}
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    msg = f"cannot write {type(value).__name__} value {value!r} to JSON"
    raise TypeError(msg)


def save_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, default=json_default)
        fh.write("\n")
    return path
