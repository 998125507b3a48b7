"""Results as files: QuPath GeoJSON, CSV tables, OME-TIFF / OME-Zarr masks, summary.json, a PNG
overview, and GeoJSON back into napari layers.

Everything written is in **level-0 pixels** of the slide, the frame QuPath uses for GeoJSON:
``x`` to the right, ``y`` down, pixel ``(0, 0)`` covering ``[0, 1) x [0, 1)`` (pixel edges).
Every file is written atomically (:func:`atomic_path`). One module per format, behind the
format -> writer table of :func:`write_result`:

- ``_atomic``: atomic writes and JSON encoding;
- ``_polygons``: label images -> polygon rings (colours: :mod:`histolens.colors`);
- ``_geojson_write`` / ``_geojson_read``: QuPath GeoJSON out, and back in (validated, as a
  :class:`GeoJSONShapes`; :func:`histolens.layers.geojson_to_layer_data` makes napari layers);
- ``_masks``: OME-TIFF and OME-Zarr (multiscale) masks; ``_tables``: CSV;
- ``_summary``: summary.json (the numbers of :meth:`~histolens.result.RegionResult.summary`);
  ``_overview``: overview.png; ``_write``: :func:`write_result`.

No napari import and no napari vocabulary: LayerDataTuples are :mod:`histolens.layers`' job.
"""

from ._atomic import atomic_path
from ._geojson_read import GeoJSONError, GeoJSONShapes, read_geojson
from ._geojson_write import (
    labels_feature_collection,
    nuclei_feature_collection,
    save_geojson,
    tiles_feature_collection,
)
from ._overview import render_overview_png
from ._polygons import labels_to_polygons
from ._write import DEFAULT_FORMATS, write_result

__all__ = [
    "DEFAULT_FORMATS",
    "GeoJSONError",
    "GeoJSONShapes",
    "atomic_path",
    "labels_feature_collection",
    "labels_to_polygons",
    "nuclei_feature_collection",
    "read_geojson",
    "render_overview_png",
    "save_geojson",
    "tiles_feature_collection",
    "write_result",
]
