"""Training and evaluation of the default model: data sets, targets, augmentation, metrics.

Sub-commands: ``histolens train nuclei|tiles`` (:mod:`.train`), ``histolens evaluate nuclei``
(:mod:`.evaluate`), ``histolens nuclei`` (:mod:`.nuclei_cli`). Torch is imported lazily by the
modules that need it, so importing this package stays light.
"""

from __future__ import annotations

__all__: list[str] = []
