"""A model packed as plain bytes for dask workers, unpacked once per worker process.

dask.distributed serialises a ``torch.nn.Module`` by walking its ``__dict__`` and putting
every small attribute into a msgpack header; a model that has run once holds caches keyed by
torch objects (dtypes) that msgpack cannot encode, and the scheduler then fails to move the
model between workers and waits forever. So the model never crosses the scheduler as a torch
object: it goes as a :class:`ModelParcel` (pickled bytes and their sha256), and each worker
process unpickles it once and keeps it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelParcel", "pack_model", "unpack_model"]

#: Models kept per worker process (one batch run uses one; a long-lived cluster may see a few).
_KEEP = 2
_UNPACKED: dict[str, Any] = {}


@dataclass(frozen=True)
class ModelParcel:
    """A model object as ``cloudpickle`` bytes; ``token`` is their sha256 (hex)."""

    token: str
    blob: bytes

    def __repr__(self) -> str:  # never print megabytes of weights in a log
        return f"ModelParcel({self.token[:12]}..., {len(self.blob)} bytes)"


def pack_model(model: Any) -> ModelParcel:
    """``model`` (anything with ``.card`` and ``.predict_tiles``) as a :class:`ModelParcel`.

    cloudpickle (dask's own) honours ``cloudpickle.register_pickle_by_value``, so models
    defined in a script or notebook reach workers that cannot import that script.
    """
    import cloudpickle

    blob = cloudpickle.dumps(model)
    return ModelParcel(hashlib.sha256(blob).hexdigest(), blob)


def unpack_model(parcel: ModelParcel | Any) -> Any:
    """The model inside ``parcel`` (unpickled once per process); any other object as is."""
    if not isinstance(parcel, ModelParcel):
        return parcel
    model = _UNPACKED.get(parcel.token)
    if model is None:
        import pickle

        model = pickle.loads(parcel.blob)
        while len(_UNPACKED) >= _KEEP:
            _UNPACKED.pop(next(iter(_UNPACKED)))
        _UNPACKED[parcel.token] = model
    return model
