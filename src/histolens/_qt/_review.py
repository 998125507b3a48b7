"""The review panel: counts per class, density, an area histogram, tile shares, a nuclei table.

It only draws a result's :class:`~histolens.result.ResultSummary` (the numbers summary.json
holds too) and its nuclei table; clicking a table row emits
``nucleus_selected(y, x)`` with the nucleus centroid in level-0 pixels.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QRectF, Qt, Signal
from qtpy.QtGui import QColor, QPainter
from qtpy.QtWidgets import (
    QAbstractItemView,
    QGridLayout,
    QLabel,
    QSizePolicy,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from histolens.result import ClassCount, RegionResult, ResultSummary

__all__ = ["ReviewPanel"]

#: Rows shown in the nuclei table; the full table goes to the Export files.
MAX_TABLE_ROWS = 5000
_TABLE_COLUMNS = ("label", "class", "µm²", "prob", "y px", "x px")


class AreaHistogram(QWidget):
    """Nucleus areas (µm²) as bars drawn with QPainter (no plotting library is installed)."""

    def __init__(self, parent: QWidget | None = None, bins: int = 24) -> None:
        super().__init__(parent)
        self._bins = bins
        self._counts = np.zeros(0, dtype=int)
        self._edges = np.zeros(0, dtype=float)
        self.setMinimumHeight(90)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)

    @property
    def counts(self) -> np.ndarray:
        """Nuclei per bin (for tests and tooltips)."""
        return self._counts

    def set_areas(self, areas_um2: np.ndarray) -> None:
        areas = np.asarray(areas_um2, dtype=float)
        areas = areas[np.isfinite(areas)]
        if areas.size:
            # up to the 99th percentile so a few merged blobs do not squash the histogram
            hi = max(float(np.percentile(areas, 99)), float(areas.min()) + 1e-6)
            self._counts, self._edges = np.histogram(
                np.clip(areas, 0, hi), bins=self._bins, range=(0, hi)
            )
        else:
            self._counts, self._edges = np.zeros(0, dtype=int), np.zeros(0, dtype=float)
        self.setToolTip(
            f"{int(areas.size)} nuclei; area {self._edges[0]:.0f}-{self._edges[-1]:.0f} µm² "
            "(last bin holds everything above the 99th percentile)"
            if areas.size
            else "no nuclei"
        )
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt override)
        painter = QPainter(self)
        try:
            w, h = self.width(), self.height()
            text_h = 14
            painter.setPen(self.palette().color(self.foregroundRole()))
            if not self._counts.size:
                text = "area histogram: no nuclei yet"
                painter.drawText(QRectF(0, 0, w, h), Qt.AlignCenter, text)
                return
            top = float(self._counts.max()) or 1.0
            bar_w = w / len(self._counts)
            plot_h = h - text_h - 2
            painter.setBrush(QColor("#4fa3e0"))
            painter.setPen(Qt.NoPen)
            for i, c in enumerate(self._counts):
                bh = plot_h * float(c) / top
                painter.drawRect(QRectF(i * bar_w + 1, plot_h - bh, max(bar_w - 2, 1), bh))
            painter.setPen(self.palette().color(self.foregroundRole()))
            painter.drawText(QRectF(0, plot_h + 2, w, text_h), Qt.AlignLeft, "0 µm²")
            painter.drawText(
                QRectF(0, plot_h + 2, w, text_h), Qt.AlignRight, f"{self._edges[-1]:.0f} µm²"
            )
            painter.drawText(
                QRectF(0, plot_h + 2, w, text_h), Qt.AlignHCenter, f"max bin {int(top)}"
            )
        finally:
            painter.end()


def _swatch(color: str) -> QLabel:
    label = QLabel()
    label.setFixedSize(12, 12)
    label.setStyleSheet(f"background-color: {color}; border: 1px solid #202020;")
    return label


class _ClassList(QWidget):
    """Rows of colour swatch, class name and a number; also the tile-class legend."""

    def __init__(self, title: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._grid = QGridLayout(self)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._title = title
        self.rows: list[tuple[str, str]] = []  # (name, text) as shown, for tests

    def set_rows(self, rows: tuple[ClassCount, ...], *, with_density: bool) -> None:
        while self._grid.count():
            item = self._grid.takeAt(0)
            if item.widget() is not None:
                item.widget().hide()  # at once: deleteLater leaves it drawn until the next loop
                item.widget().deleteLater()
        self.rows = []
        header = QLabel(f"<b>{self._title}</b>")
        self._grid.addWidget(header, 0, 0, 1, 4)
        for r, row in enumerate(rows, start=1):
            text = f"{row.count} ({100 * row.fraction:.0f}\u00a0%)"
            density = ""
            if with_density and row.per_mm2 is not None:
                density = f"{row.per_mm2:.0f}/mm²"
            self._grid.addWidget(_swatch(row.color), r, 0)
            for c, value in ((1, row.name), (2, text), (3, density)):
                label = QLabel(value)
                label.setWordWrap(c < 3)  # in a narrow dock names and shares wrap, densities not
                self._grid.addWidget(label, r, c)
            text = f"{text}  {density}" if density else text
            self.rows.append((row.name, text))
        self.setVisible(bool(rows))


def summary_header(s: ResultSummary) -> str:
    """The panel's first line (rich text): nuclei, density, analysed tissue, progress."""
    state = "complete" if s.complete else ("cancelled" if s.cancelled else "running")
    density = f"{s.density_per_mm2:.0f}" if s.density_per_mm2 is not None else "n/a"
    tissue = f"{s.tissue_mm2:.3f} mm²" if s.tissue_mm2 is not None else "n/a mm² (no mpp)"
    return (
        f"<b>{s.n_nuclei}</b> nuclei, <b>{density}</b>/mm² over {tissue} "
        f"({s.tissue_source}); tiles {s.tiles_done}/{s.tiles_total}, {state}"
    )


class ReviewPanel(QWidget):
    """Summary of the last result; click a nucleus row to centre the view on it."""

    nucleus_selected = Signal(float, float)  # centroid (y, x) in level-0 pixels

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.summary: ResultSummary | None = None
        self.header = QLabel("No analysis yet: click “Analyze view”.")
        self.header.setWordWrap(True)
        self.nuclei_classes = _ClassList("Nuclei per class")
        self.histogram = AreaHistogram()
        self.tile_legend = _ClassList("Tile classes (share of cells)")
        self.table = QTableWidget(0, len(_TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(_TABLE_COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.setMinimumHeight(160)
        self.table.cellClicked.connect(self._on_cell_clicked)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for w in (self.header, self.nuclei_classes, self.histogram, self.tile_legend, self.table):
            layout.addWidget(w)
        self.nuclei_classes.setVisible(False)
        self.tile_legend.setVisible(False)

    def show_result(self, result: RegionResult | None, *, fill_table: bool = True) -> None:
        """Redraw everything for ``result`` (None clears the panel).

        ``fill_table=False`` skips the nuclei table, which is the slow part, for partial
        results arriving several times a second.
        """
        if result is None:
            self.summary = None
            self.header.setText("No analysis yet: click “Analyze view”.")
            self.nuclei_classes.set_rows((), with_density=False)
            self.tile_legend.set_rows((), with_density=False)
            self.histogram.set_areas(np.zeros(0))
            self.table.setRowCount(0)
            return
        s = result.summary()
        self.summary = s
        self.header.setText(summary_header(s))
        self.nuclei_classes.set_rows(s.nuclei_by_class, with_density=True)
        unsure = () if s.tiles_unsure is None else (s.tiles_unsure,)
        self.tile_legend.set_rows((*s.tiles_by_class, *unsure), with_density=False)
        self.histogram.set_areas(s.nucleus_areas_um2)
        if fill_table:
            self._fill_table(result)

    def _fill_table(self, result: RegionResult) -> None:
        self.table.setSortingEnabled(False)
        if result.nuclei is None:
            self.table.setRowCount(0)
            return
        feats = result.nuclei.features.head(MAX_TABLE_ROWS)
        self.table.setRowCount(len(feats))
        cols = [
            feats["label"].to_numpy(),
            feats["class_name"].astype(str).to_numpy(),
            feats["area_um2"].to_numpy(dtype=float),
            feats["probability"].to_numpy(dtype=float),
            feats["centroid_y"].to_numpy(dtype=float),
            feats["centroid_x"].to_numpy(dtype=float),
        ]
        for r in range(len(feats)):
            for c, values in enumerate(cols):
                value = values[r]
                item = QTableWidgetItem()
                if isinstance(value, str):
                    item.setText(value)
                elif c in (0,):
                    item.setData(Qt.DisplayRole, int(value))
                else:
                    item.setData(Qt.DisplayRole, round(float(value), 2 if c in (2, 3) else 1))
                self.table.setItem(r, c, item)
        self.table.sortByColumn(0, Qt.AscendingOrder)  # by label, as the features table
        self.table.setSortingEnabled(True)
        self.table.resizeColumnsToContents()

    def _on_cell_clicked(self, row: int, _column: int) -> None:
        y_item, x_item = self.table.item(row, 4), self.table.item(row, 5)
        if y_item is None or x_item is None:
            return
        y, x = float(y_item.data(Qt.DisplayRole)), float(x_item.data(Qt.DisplayRole))
        self.nucleus_selected.emit(y, x)
