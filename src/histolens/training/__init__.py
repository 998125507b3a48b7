"""Training and evaluation of the default model: data sets, targets, augmentation, metrics.

Sub-commands: ``histolens train nuclei|tiles|release`` and ``histolens evaluate nuclei``, their
options in :mod:`.cli` and :mod:`.config`, run by :mod:`.train`, :mod:`.probe`,
:mod:`.release` and :mod:`.evaluate`. User inference on images (``histolens nuclei``) is
:mod:`histolens.nuclei`, which this package builds on. Torch is imported lazily by the modules
that need it, so importing this package stays light.
"""

from __future__ import annotations

__all__: list[str] = []
