"""The dock's "Teach" section: the user's own tile classes, taught by painting cells.

A napari Labels layer ``"teach"`` covers the slide's whole grid of tile-class cells (one
pixel per cell, aligned with the ``"tile classes"`` layer); label ``k`` marks a cell as class
``k - 1`` of the class list. Painting, erasing and napari's own undo/redo all change that
layer; a debounced sync turns the marks into examples (their embeddings come from the
analysed view, or from analysing just the marked cells' tiles when they lie outside it),
refits the probe (:func:`histolens.teach.train_tile_classifier`) and re-classifies the
analysed view from its cached embeddings; the backbone does not run again for that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QColorDialog,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import qdebounced

from histolens.colors import to_hex
from histolens.models.probe import PALETTE as CLASS_PALETTE
from histolens.region import Region
from histolens.result import RegionResult
from histolens.teach import (
    CV_MIN_EXAMPLES,
    TileClassifier,
    TrainingSet,
    cells_region,
    classify_result,
    global_cells,
    grouped_cv_accuracy,
    load_tile_classifier,
    lookup_cells,
    train_tile_classifier,
)

__all__ = ["TeachPanel"]

TEACH_LAYER = "teach"
RETRAIN_DEBOUNCE_MS = 300
#: Colours offered to new classes (cycled): the probe's palette, as napari takes them.
PALETTE = tuple(to_hex(rgb) for rgb in CLASS_PALETTE)


def _icon(color: str) -> QIcon:
    pix = QPixmap(12, 12)
    pix.fill(QColor(color))
    return QIcon(pix)


class TeachPanel(QWidget):
    """Class list, example counts, grouped CV accuracy, confidence, save/load.

    ``show_tiles(result)`` is the dock's callback that puts a re-classified result on the
    tile-class layer, the legend and the review panel (and makes it the exported result).
    """

    def __init__(
        self,
        viewer: Any,
        show_tiles: Callable[[RegionResult], None],
        *,
        analyse_cells: Callable[[Region, Callable[[RegionResult | None], None]], Any] | None = None,
        slide_shape: Callable[[], tuple[int, int] | None] = lambda: None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._show_tiles = show_tiles
        self._analyse_cells = analyse_cells
        self._slide_shape = slide_shape
        self.base: RegionResult | None = None  # the analysis as the model classified it
        self.classifier: TileClassifier | None = None  # active taught classifier
        self.names: list[str] = []
        self.colors: list[str] = []
        # what is known of marked cells of the global grid, (row, col) -> embedding; glass
        # cells have none; pending ones are being analysed
        self._embeddings: dict[tuple[int, int], np.ndarray] = {}
        self._glass: set[tuple[int, int]] = set()
        self._pending: set[tuple[int, int]] = set()
        self._synced: np.ndarray | None = None  # teach-layer data last synced
        self._cv_stamp = 0
        self._cv_worker: Any = None
        self._backbone: tuple[str, str] | None = None  # (name, weights sha256) of embeddings
        self._last_problem = ""
        self._build()
        self._sync_later = qdebounced(self.sync, timeout=RETRAIN_DEBOUNCE_MS, parent=self)

    # --- construction --------------------------------------------------------------------
    def _build(self) -> None:
        self.class_list = QListWidget()
        self.class_list.setMaximumHeight(130)
        self.class_list.currentRowChanged.connect(self._on_class_selected)
        self.class_list.itemDoubleClicked.connect(lambda _item: self._on_rename())
        buttons = QGridLayout()
        for i, (text, slot, tip) in enumerate(
            (
                ("Add", self._on_add, "add a class; then paint its cells on the 'teach' layer"),
                ("Rename", self._on_rename, "rename the selected class"),
                ("Colour", self._on_recolour, "recolour the selected class"),
                ("Delete", self._on_delete, "delete the selected class and its examples"),
            )
        ):
            b = QPushButton(text)
            b.setToolTip(tip)
            b.clicked.connect(slot)
            buttons.addWidget(b, i // 2, i % 2)
        self.from_model_button = QPushButton("Start from the model's classes")
        self.from_model_button.clicked.connect(self.start_from_model)
        self.confidence = QDoubleSpinBox()
        self.confidence.setRange(0.0, 1.0)
        self.confidence.setSingleStep(0.05)
        self.confidence.setValue(0.5)
        self.confidence.setToolTip("cells whose top class probability is below this stay unpainted")
        self.confidence.valueChanged.connect(lambda _v: self.repaint())
        self.counts = QLabel("")
        self.counts.setWordWrap(True)
        self.status = QLabel(
            "Analyse a view, add 2+ classes, then paint cells of each on the 'teach' layer."
        )
        self.status.setWordWrap(True)
        self.save_button = QPushButton("Save classifier...")
        self.save_button.clicked.connect(self._on_save_clicked)
        self.load_button = QPushButton("Load classifier...")
        self.load_button.clicked.connect(self._on_load_clicked)
        self.off_button = QPushButton("Model's classes")
        self.off_button.setToolTip("switch the taught classifier off (examples are kept)")
        self.off_button.clicked.connect(self.deactivate)
        files = QGridLayout()
        files.addWidget(self.save_button, 0, 0)
        files.addWidget(self.load_button, 0, 1)
        files.addWidget(self.off_button, 1, 0, 1, 2)
        form = QFormLayout()
        form.addRow("min. confidence", self.confidence)
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        col.addWidget(self.class_list)
        col.addLayout(buttons)
        col.addWidget(self.from_model_button)
        col.addLayout(form)
        col.addWidget(self.counts)
        col.addWidget(self.status)
        col.addLayout(files)

    # --- the analysed result -------------------------------------------------------------
    def apply(self, result: RegionResult, *, final: bool) -> RegionResult:
        """What the dock should show for ``result``: re-classified when a classifier is active.

        A final result with cell embeddings becomes the base that painting re-classifies.
        """
        tiles = result.tiles
        if tiles is None or tiles.embeddings is None:
            return result
        if final:
            self._forget_other_backbone(result)
            self.base = result
        if self.classifier is None:
            return result
        try:
            return classify_result(result, self.classifier, min_confidence=self.min_confidence)
        except ValueError as exc:
            show_warning(f"HistoLens: taught classes not applied: {exc}")
            return result

    def _forget_other_backbone(self, result: RegionResult) -> None:
        """Embeddings are one backbone's: another model's analysis re-embeds the marked cells."""
        card = result.provenance.model_card
        backbone = (str(card.get("name", "")), str(card.get("weights_sha256", "")))
        if self._backbone is not None and backbone != self._backbone:
            self._embeddings, self._glass = {}, set()
        self._backbone = backbone

    @property
    def min_confidence(self) -> float:
        return float(self.confidence.value())

    def layer(self) -> Any | None:
        """The ``"teach"`` Labels layer, or None."""
        for layer in self.viewer.layers:
            if layer.metadata.get("histolens_teach"):
                return layer
        return None

    def place_layer(self) -> None:
        """Put the teach layer (the slide's whole cell grid) under the "tile classes" layer's
        cells, and take marked cells that the new analysis covers as examples."""
        if self.base is None or not self.names:
            return
        tiles_layer = next(
            (
                lyr
                for lyr in self.viewer.layers
                if lyr.metadata.get("histolens_overlay") == "tile classes"
            ),
            None,
        )
        shape = self._slide_shape()
        if tiles_layer is None or shape is None:
            return
        tiles = self.base.tiles
        grid = (int(np.ceil(shape[0] / tiles.cell)), int(np.ceil(shape[1] / tiles.cell)))
        layer = self.layer()
        if layer is not None and layer.data.shape != grid:  # another slide or cell size
            self.viewer.layers.remove(layer)
            self._embeddings, self._glass, layer = {}, set(), None
        if layer is None:
            layer = self.viewer.add_labels(
                np.zeros(grid, np.int32),
                name=TEACH_LAYER,
                opacity=0.8,
                metadata={"histolens_teach": True},
            )
            layer.events.paint.connect(self._on_layer_edited)
            layer.events.set_data.connect(self._on_layer_edited)
        # teach pixel (row, col) is global cell (row, col); tile-layer pixel (0, 0) is (r0, c0)
        scale = np.asarray(tiles_layer.scale, float)
        layer.scale = scale
        layer.translate = (
            np.asarray(tiles_layer.translate, float) - np.array(global_cells(tiles)) * scale
        )
        layer.brush_size = 1
        self._update_colormap()
        self._on_class_selected(self.class_list.currentRow())
        self._synced = None  # the new analysis may hold embeddings of marked cells
        self._sync_later()

    def _update_colormap(self) -> None:
        layer = self.layer()
        if layer is None:
            return
        colors = {None: (0.0, 0.0, 0.0, 0.0), 0: (0.0, 0.0, 0.0, 0.0)}
        for k, c in enumerate(self.colors):
            q = QColor(c)
            colors[k + 1] = (q.redF(), q.greenF(), q.blueF(), 1.0)
        from napari.utils.colormaps import DirectLabelColormap

        layer.colormap = DirectLabelColormap(color_dict=colors)

    # --- class list ----------------------------------------------------------------------
    def add_class(self, name: str, color: str | None = None) -> int:
        """Append a class; returns its index (label value ``index + 1`` on the teach layer)."""
        name = name.strip()
        if not name or name in self.names:
            show_warning(f"HistoLens: class name {name!r} is empty or already used")
            return -1
        self.names.append(name)
        self.colors.append(color or PALETTE[(len(self.names) - 1) % len(PALETTE)])
        self.class_list.addItem(QListWidgetItem(_icon(self.colors[-1]), name))
        self.class_list.setCurrentRow(len(self.names) - 1)
        if self.layer() is None:
            self.place_layer()
        self._update_colormap()
        self._refresh_counts()
        return len(self.names) - 1

    def start_from_model(self) -> None:
        """Fill the class list with the analysing model's tissue classes and colours."""
        if self.base is None or self.base.tiles is None:
            show_warning("HistoLens: analyse a view first (with tile classes)")
            return
        tiles = self.base.tiles
        for name, color in zip(tiles.class_names, tiles.class_colors, strict=True):
            if name not in self.names:
                self.add_class(name, color)

    def select_class(self, index: int) -> None:
        self.class_list.setCurrentRow(index)

    def _on_class_selected(self, row: int) -> None:
        layer = self.layer()
        if layer is None or row < 0:
            return
        layer.selected_label = row + 1
        self.viewer.layers.selection.active = layer
        layer.mode = "paint"

    def _on_add(self) -> None:
        name, ok = QInputDialog.getText(self, "Add a tile class", "class name:")
        if ok:
            self.add_class(name)

    def _on_rename(self) -> None:
        row = self.class_list.currentRow()
        if row < 0:
            return
        name, ok = QInputDialog.getText(self, "Rename class", "new name:", text=self.names[row])
        if ok:
            self.rename_class(row, name)

    def rename_class(self, row: int, name: str) -> None:
        name = name.strip()
        if not name or name in self.names:
            show_warning(f"HistoLens: class name {name!r} is empty or already used")
            return
        self.names[row] = name
        self.class_list.item(row).setText(name)
        self._relabel_classifier()

    def _on_recolour(self) -> None:
        row = self.class_list.currentRow()
        if row < 0:
            return
        color = QColorDialog.getColor(QColor(self.colors[row]), self, "Class colour")
        if color.isValid():
            self.recolour_class(row, color.name())

    def recolour_class(self, row: int, color: str) -> None:
        self.colors[row] = color
        self.class_list.item(row).setIcon(_icon(color))
        self._update_colormap()
        self._relabel_classifier()

    def _relabel_classifier(self) -> None:
        """Names and colours changed: the fitted weights stay, the map is redrawn."""
        if self.classifier is not None and len(self.classifier.class_names) == len(self.names):
            self.classifier = replace(
                self.classifier, class_names=tuple(self.names), class_colors=tuple(self.colors)
            )
            self.repaint()
        self._refresh_counts()

    def _on_delete(self) -> None:
        row = self.class_list.currentRow()
        if row >= 0:
            self.delete_class(row)

    def delete_class(self, row: int) -> None:
        """Remove class ``row`` and its examples; later classes move up by one."""
        del self.names[row], self.colors[row]
        self.class_list.takeItem(row)
        layer = self.layer()
        if layer is not None:
            data = np.asarray(layer.data).copy()
            data[data == row + 1] = 0
            data[data > row + 1] -= 1
            self._synced = data.copy()
            layer.data = data
        self._update_colormap()
        self.retrain()

    # --- examples and training -----------------------------------------------------------
    def _on_layer_edited(self, *_: Any) -> None:
        self._sync_later()

    def _marked_cells(self) -> np.ndarray:
        """Global ``(row, col)`` (N, 2) of cells marked with an existing class."""
        layer = self.layer()
        if layer is None:
            return np.zeros((0, 2), np.int64)
        marks = np.asarray(layer.data)
        return np.argwhere((marks > 0) & (marks <= len(self.names)))

    def sync(self) -> None:
        """Take the teach layer's marks as examples and retrain if they changed.

        Marked cells in the analysed view take its embeddings; marked cells outside it are
        analysed (tile task only, just their tiles) and join when that finishes.
        """
        layer = self.layer()
        if layer is None or self.base is None:
            return
        marks = np.asarray(layer.data)
        if self._synced is not None and np.array_equal(marks, self._synced):
            return
        self._synced = marks.copy()
        cells = [tuple(int(v) for v in c) for c in self._marked_cells()]
        unknown = [c for c in cells if c not in self._embeddings and c not in self._glass]
        if unknown:
            inside, tissue, emb = lookup_cells(self.base.tiles, np.array(unknown))
            for cell, i, t, e in zip(unknown, inside, tissue, emb, strict=True):
                if t:
                    self._embeddings[cell] = e
                elif i:
                    self._glass.add(cell)
            self._analyse([c for c, i in zip(unknown, inside, strict=True) if not i])
        on_glass = sum(c in self._glass for c in cells)
        if on_glass and not any(c in self._embeddings for c in cells):
            show_warning(
                f"HistoLens: the {on_glass} marked cell(s) lie on glass and carry no tissue "
                "embedding; mark tissue cells"
            )
        if not cells:
            self._refresh_counts()
            return
        self.retrain()

    def _analyse(self, cells: list[tuple[int, int]]) -> None:
        """Analyse marked cells outside the view, one small region per 8 x 8-cell block."""
        todo = [c for c in cells if c not in self._pending]
        if not todo or self._analyse_cells is None:
            return
        self._pending.update(todo)
        blocks: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for r, c in todo:
            blocks.setdefault((r // 8, c // 8), []).append((r, c))
        for group in blocks.values():
            region = cells_region(np.array(group), self.base.tiles.cell)
            self._analyse_cells(region, lambda res, g=group: self._on_cells_analysed(g, res))
        self.status.setText(f"analysing {len(todo)} marked cell(s) outside the analysed view ...")

    def _on_cells_analysed(self, cells: list[tuple[int, int]], result: RegionResult | None) -> None:
        self._pending.difference_update(cells)
        if result is None or result.tiles is None or result.tiles.embeddings is None:
            return
        card = result.provenance.model_card
        if (str(card.get("name", "")), str(card.get("weights_sha256", ""))) != self._backbone:
            return  # analysed with a model that is no longer the one shown
        _inside, tissue, emb = lookup_cells(result.tiles, np.array(cells))
        for cell, t, e in zip(cells, tissue, emb, strict=True):
            if t:
                self._embeddings[cell] = e
            else:
                self._glass.add(cell)
        self._synced = None
        self.sync()

    def training_set(self) -> TrainingSet:
        """Every marked cell with an embedding, in and outside the current view."""
        cells = [(int(r), int(c)) for r, c in self._marked_cells() if (r, c) in self._embeddings]
        if not cells:
            return TrainingSet(np.zeros((0, 2), np.int64), np.zeros(0, np.int64), np.zeros((0, 0)))
        marks = np.asarray(self.layer().data)
        return TrainingSet(
            cells=np.array(cells, np.int64),
            labels=np.array([marks[c] - 1 for c in cells], np.int64),
            embeddings=np.stack([self._embeddings[c] for c in cells]).astype(np.float32),
        )

    def retrain(self) -> TileClassifier | None:
        """Refit on the examples and repaint; on bad input, say why and keep the last classifier."""
        self._refresh_counts()
        if self.base is None:
            return None
        try:
            clf = train_tile_classifier(
                self.training_set(),
                self.names,
                self.colors,
                self.base.provenance.model_card,
                cv=False,
            )
        except ValueError as exc:
            self.status.setText(f"not trained: {exc}")
            if str(exc) != self._last_problem:  # once per problem, not once per stroke
                show_warning(f"HistoLens: {exc}; the previous tile classes stay")
            self._last_problem = str(exc)
            return None
        self._last_problem = ""
        self.classifier = clf
        self.repaint()
        self._start_cv()
        return clf

    def repaint(self) -> None:
        """Re-classify the base result with the active classifier and show it."""
        if self.base is None or self.classifier is None:
            return
        try:
            shown = classify_result(self.base, self.classifier, min_confidence=self.min_confidence)
        except ValueError as exc:
            show_error(f"HistoLens: {exc}")
            return
        self._show_tiles(shown)
        self.status.setText(self._describe())

    def deactivate(self) -> None:
        """Back to the model's own classes (examples and class list are kept)."""
        self.classifier = None
        if self.base is not None:
            self._show_tiles(self.base)
        self.status.setText("showing the model's classes; paint to teach again")

    def _start_cv(self) -> None:
        """Grouped CV of the current examples in a thread, one run at a time (the latest
        examples run next); the label updates when it is done."""
        self._cv_stamp += 1
        if self._cv_worker is not None:
            return
        stamp, n = self._cv_stamp, len(self.names)
        worker = create_worker(grouped_cv_accuracy, self.training_set(), n, _ignore_errors=True)
        worker.returned.connect(lambda acc: self._on_cv(stamp, acc))
        worker.finished.connect(lambda: self._on_cv_finished(stamp))
        self._cv_worker = worker  # referenced until finished, or Qt may drop its signals
        worker.start()

    @property
    def busy(self) -> bool:
        """True while a grouped cross-validation runs in the background."""
        return self._cv_worker is not None

    def _on_cv(self, stamp: int, accuracy: float | None) -> None:
        if stamp != self._cv_stamp or self.classifier is None:
            return
        self.classifier = replace(self.classifier, cv_accuracy=accuracy)
        self.status.setText(self._describe())

    def _on_cv_finished(self, stamp: int) -> None:
        self._cv_worker = None
        if stamp != self._cv_stamp:  # examples changed meanwhile
            self._cv_stamp -= 1
            self._start_cv()

    def _describe(self) -> str:
        clf = self.classifier
        if clf is None:
            return ""
        if clf.cv_accuracy is None:
            cv = f"grouped CV once every class has {CV_MIN_EXAMPLES}+ examples"
        else:
            cv = f"grouped CV accuracy {clf.cv_accuracy:.2f}"
        return f"taught: {len(clf.class_names)} classes; {cv}"

    def _refresh_counts(self) -> None:
        counts = np.bincount(self.training_set().labels, minlength=len(self.names))
        rows = [f"{name}: {int(counts[i])}" for i, name in enumerate(self.names)]
        text = "examples: " + (", ".join(rows) if rows else "none")
        if self._pending:
            text += f" ({len(self._pending)} cell(s) being analysed)"
        self.counts.setText(text)

    # --- files ---------------------------------------------------------------------------
    def _on_save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save tile classifier", "tile-classes.safetensors", "Safetensors (*.safetensors)"
        )
        if path:
            self.save_classifier(path)

    def _on_load_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Load tile classifier", "", "Tile classifier (*.safetensors *.card.json)"
        )
        if path:
            self.load_classifier(path)

    def save_classifier(self, path: str) -> str | None:
        """Write the active classifier (with its grouped CV accuracy) to ``path``."""
        if self.classifier is None:
            show_warning("HistoLens: nothing to save yet; teach at least 2 classes first")
            return None
        clf = replace(self.classifier, min_confidence=self.min_confidence)
        if clf.cv_accuracy is None:
            n = len(clf.class_names)
            clf = replace(clf, cv_accuracy=grouped_cv_accuracy(self.training_set(), n))
        try:
            written = clf.save(path)
        except OSError as exc:
            show_error(f"HistoLens could not save the classifier to {path}: {exc}")
            return None
        show_info(f"HistoLens: saved the tile classifier to {written}")
        return str(written)

    def load_classifier(self, path: str) -> TileClassifier | None:
        """Make the classifier in ``path`` active; on any problem keep the current one."""
        try:
            clf = load_tile_classifier(path)
            if self.base is not None:
                clf.check_backbone(self.base.provenance.model_card, source="the analysed view")
                clf.classify(self.base.tiles)  # embedding width checked here
        except (OSError, ValueError) as exc:
            show_error(f"HistoLens: {exc}; the current tile classes stay")
            return None
        self.classifier = clf
        self.confidence.blockSignals(True)
        self.confidence.setValue(clf.min_confidence)
        self.confidence.blockSignals(False)
        self.names, self.colors = list(clf.class_names), list(clf.class_colors)
        self.class_list.clear()
        for name, color in zip(self.names, self.colors, strict=True):
            self.class_list.addItem(QListWidgetItem(_icon(color), name))
        layer = self.layer()
        if layer is not None:
            self._synced = np.zeros_like(layer.data)
            layer.data = self._synced.copy()
        self.place_layer()
        self._refresh_counts()
        self.repaint()
        return clf
