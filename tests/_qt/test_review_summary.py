"""One summary: the dock's review panel, summary.json and ``RegionResult.summary()`` agree.

The real default model on a small region of the real sample slide, with its mpp overridden to
0.25 um/px so the analysis runs at a downsample (0.5 um/px, f = 2): areas must use the level-0
mpp, which a copy computed with the analysis mpp would get 4x wrong.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from histolens.region import Region

pytestmark = pytest.mark.gui
pytest.importorskip("qtpy")

SLIDE_MPP = 0.25  # um per level-0 px (overriding the slide's 0.499): analysis at f = 2
REGION = Region(1000, 1200, 1512, 1712)


@pytest.fixture(scope="module")
def real_result(wsi_dir: Path):
    import torch

    from histolens.inference import analyze_region
    from histolens.slide import open_slide

    torch.set_num_threads(1)
    with open_slide(wsi_dir / "CMU-1-Small-Region.svs", mpp=SLIDE_MPP) as slide:
        return analyze_region(slide, REGION, cache=False)


def _header_numbers(text: str) -> tuple[int, int, float]:
    """(nuclei, density per mm^2, tissue mm^2) as the panel's header shows them."""
    m = re.search(r"<b>(\d+)</b> nuclei, <b>(\d+)</b>/mm² over ([\d.]+) mm²", text)
    assert m, text
    return int(m[1]), int(m[2]), float(m[3])


def test_dock_text_summary_json_and_summary_agree(real_result, qtbot, tmp_path: Path):
    from histolens._qt._review import ReviewPanel
    from histolens.export import write_result

    result = real_result
    assert result.provenance.model_name == "histolens-default"
    assert result.analysis_mpp == pytest.approx(2 * SLIDE_MPP)
    s = result.summary()
    assert s.n_nuclei == result.nuclei.count > 0 and s.analysed_cells > 0

    # The one fact, checked from first principles: tissue cells times the level-0 cell area.
    cell_um = result.tiles.cell * SLIDE_MPP
    assert s.tissue_mm2 == pytest.approx(s.analysed_cells * cell_um**2 / 1e6)
    assert s.density_per_mm2 == pytest.approx(s.n_nuclei / s.tissue_mm2)

    panel = ReviewPanel()
    qtbot.addWidget(panel)
    panel.show_result(result)
    n, density, tissue = _header_numbers(panel.header.text())
    assert (n, density) == (s.n_nuclei, round(s.density_per_mm2))
    assert tissue == pytest.approx(s.tissue_mm2, abs=5e-4)
    shown = dict(panel.nuclei_classes.rows)
    for row in s.nuclei_by_class:
        assert shown[row.name].startswith(f"{row.count} (")
        assert shown[row.name].endswith(f"{row.per_mm2:.0f}/mm²")

    files = write_result(result, tmp_path, formats=("summary",))
    saved = json.loads(files["summary.json"].read_text())
    assert saved["nuclei"]["count"] == s.n_nuclei == n
    assert saved["nuclei"]["per_class"] == {r.name: r.count for r in s.nuclei_by_class}
    assert saved["nuclei"]["per_mm2"] == pytest.approx(s.density_per_mm2)
    assert saved["tissue_mm2"] == pytest.approx(s.tissue_mm2)
    assert saved["region_mm2"] == pytest.approx(REGION.area * SLIDE_MPP**2 / 1e6)
    assert saved["tiles"]["analysed_cells"] == s.analysed_cells
    per_class = saved["tiles"]["per_class"]
    assert {k: v["cells"] for k, v in per_class.items()} == {
        r.name: r.count for r in s.tiles_by_class
    }
    assert sum(v["mm2"] for v in per_class.values()) == pytest.approx(s.tissue_mm2)
