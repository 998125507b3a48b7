"""Whole-slide and many-slide runs, here or on ``dask.distributed``: ``histolens analyze``.

Words, from small to large (all boxes in analysis pixels unless said):

- **tile**: a cell of the engine's global grid (:mod:`histolens.tiles`); it owns its inner box
  and is seen with the model card's halo around it.
- **block**: adjacent tiles read and run as one model input, with the halo around the block.
- **batch** (``batch_size``): the blocks of one model call (this module's name means the
  other batch: many slides in one run).
- **shard**: the blocks whose top-left corner falls in one square of ``shard_px``; one task,
  run where the work runs (this process, or a dask worker that reopens the slide from its
  path).

A slide's tiles are kept where the tissue mask of a low pyramid level finds tissue
(:func:`tissue_mask`), grouped into the engine's blocks and dealt into shards. A tile keeps the
nuclei whose centroid it owns, seen whole thanks to the halo, so shards need no overlap of
their own; the main process then pastes every tile's output in the engine's order with the
engine's canvases. Nuclei labels and tile classes are therefore the same however the shards
were spread over workers, and the same as :func:`histolens.inference.analyze_region` on the
whole region when the mask is off; float outputs of a torch model agree to float32 rounding
(~1e-7: BLAS sums depend on the thread count and on which blocks share a model call).

From Python::

    from histolens.batch import BatchOptions, run_batch

    outcomes = run_batch(["a.svs", "b.ndpi"], "results", BatchOptions(workers=2))
"""

from __future__ import annotations

from ._options import DEFAULT_SHARD_PX, BatchOptions
from ._plan import SlideOutcome
from ._run import run_batch
from ._tissue import tissue_mask

__all__ = ["DEFAULT_SHARD_PX", "BatchOptions", "SlideOutcome", "run_batch", "tissue_mask"]
