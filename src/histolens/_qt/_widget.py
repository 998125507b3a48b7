"""``HistoLensWidget``: the dock that analyses the view and shows aligned overlays.

Thin by design: it reads controls, captures the camera (:mod:`._viewport`), runs
:func:`._worker.analysis_job` in a napari thread worker, and hands each result to
:func:`._overlays.update_overlays` and the :class:`._review.ReviewPanel` on the main thread.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSlider,
    QToolButton,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import qdebounced

from histolens.layers import result_to_layer_data
from histolens.models import ALL_TASKS
from histolens.progress import progress_text
from histolens.region import Region
from histolens.result import RegionResult

from ._explain import ExplainInputs, ExplainPanel
from ._overlays import is_overlay, overlay_group, update_overlays
from ._review import ReviewPanel
from ._slides import slide_for_layer
from ._teach import TeachPanel
from ._viewport import CameraState, LayerFrame, level0_to_world, view_region
from ._worker import (
    AnalysisRequest,
    JobOutcome,
    ModelCache,
    analysis_job,
    export_job,
    preload_model_stack,
    tiles_job,
)

__all__ = ["HistoLensWidget", "Section"]

ANALYZE, CANCEL = "Analyze view", "Cancel"
DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_OPACITY = {"nuclei": 0.6, "tile classes": 0.25, "attention": 0.4}
LIVE_DEBOUNCE_MS = 500
PARTIAL_REFRESH_MS = 150


class Section(QWidget):
    """A titled, collapsible part of the dock: a header button that shows or hides ``content``.

    Not superqt's QCollapsible: it caps expanded content at its ``sizeHint`` height, which
    ignores the extra lines word-wrapped labels need in a narrow dock, so their text got cut.
    """

    def __init__(self, title: str, content: QWidget, *, expanded: bool = True) -> None:
        super().__init__()
        self.content = content
        self.header = QToolButton()
        self.header.setText(title)
        self.header.setCheckable(True)
        self.header.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.header.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.header.setStyleSheet("QToolButton { border: none; font-weight: bold; }")
        self.header.toggled.connect(self._on_toggled)
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 4)
        col.addWidget(self.header)
        col.addWidget(content)
        self.header.setChecked(expanded)
        self._on_toggled(expanded)

    def _on_toggled(self, on: bool) -> None:
        self.header.setArrowType(Qt.DownArrow if on else Qt.RightArrow)
        self.content.setVisible(on)

    def isExpanded(self) -> bool:  # noqa: N802 (Qt naming, as QCollapsible)
        return self.header.isChecked()

    def expand(self) -> None:
        self.header.setChecked(True)

    def collapse(self) -> None:
        self.header.setChecked(False)


class HistoLensWidget(QWidget):
    """The "HistoLens" dock for ``napari_viewer``."""

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.result: RegionResult | None = None  # what the overlays and review panel show
        self._models = ModelCache()
        self._stamp = 0
        self._request: AnalysisRequest | None = None
        self._worker: Any = None
        self._frame: LayerFrame | None = None  # slide-layer frame of the running request
        self._pending: RegionResult | None = None
        self._slide_cache: dict[int, Any] = {}
        self.sections: dict[str, Section] = {}
        self._side_workers: set[Any] = set()
        self._build()
        self._refresh_layer_choices()
        self.viewer.layers.events.inserted.connect(self._refresh_layer_choices)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._live_trigger = qdebounced(
            self._on_view_settled, timeout=LIVE_DEBOUNCE_MS, parent=self
        )
        camera = self.viewer.scene.camera
        camera.events.center.connect(self._on_view_changed)
        camera.events.zoom.connect(self._on_view_changed)
        self.viewer.canvas.events.size.connect(self._on_view_changed)

    def select_model(self, name: str) -> None:
        """Choose a registered model, adding it to the list when it is not shown by default
        (an architecture without trained weights: asked for by name, so the user knows)."""
        from histolens.models import list_models

        if self.model_combo.findText(name) < 0:
            if name not in list_models():
                msg = f"unknown model {name!r}; choose one of {list_models()}"
                raise ValueError(msg)
            self.model_combo.addItem(name)
            if name not in list_models(trained=True):
                show_warning(
                    f"HistoLens: {name!r} has no trained weights here; its nuclei and classes "
                    "are not meaningful"
                )
        self.model_combo.setCurrentIndex(self.model_combo.findText(name))

    # --- construction ------------------------------------------------------------------
    def _build(self) -> None:
        self.layer_combo = QComboBox()
        self.layer_combo.currentIndexChanged.connect(self._on_layer_changed)
        self.model_combo = QComboBox()
        try:
            from histolens.models import list_models

            # Only models with trained weights here: an untrained architecture would paint
            # random nuclei on the slide. The others stay reachable from Python.
            self.model_combo.addItems(list_models(trained=True) or list_models())
            self.model_combo.setToolTip(
                "models with trained weights on this machine; "
                "histolens.list_models() lists every architecture"
            )
        except Exception as exc:  # noqa: BLE001 (the dock must open to report it)
            show_error(f"HistoLens: could not list models ({exc})")
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        for combo in (self.layer_combo, self.model_combo, self.device_combo):
            # long layer/model names must not widen the narrow dock
            combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            combo.setMinimumContentsLength(8)
        self.task_boxes: dict[str, QCheckBox] = {}
        tasks_row = QHBoxLayout()
        tasks_row.setSpacing(4)
        for task in ALL_TASKS:
            box = QCheckBox(task)
            box.setChecked(True)
            self.task_boxes[task] = box
            tasks_row.addWidget(box)
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.0, 100.0)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setSpecialValueText("from slide")
        self.mpp_spin.setMinimumWidth(60)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.setToolTip("Pixel size of level 0, used when the slide does not record one")
        self.mpp_label = QLabel()
        self.live_box = QCheckBox("Live")
        self.live_box.setToolTip(
            "Re-analyse the view after each pan/zoom (debounced, latest view wins)"
        )
        self.live_box.toggled.connect(self._on_live_toggled)

        self.analyze_button = QPushButton(ANALYZE)
        self.analyze_button.clicked.connect(self._on_analyze_clicked)
        self.progress = QProgressBar()
        self.progress.setFormat("%v / %m tiles")
        self.progress.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        self.opacity_sliders: dict[str, QSlider] = {}
        opacity_form = QFormLayout()
        for group, value in DEFAULT_OPACITY.items():
            slider = QSlider(Qt.Horizontal)
            slider.setRange(0, 100)
            slider.setValue(int(round(value * 100)))
            slider.valueChanged.connect(lambda v, g=group: self._set_opacity(g, v / 100.0))
            self.opacity_sliders[group] = slider
            opacity_form.addRow(f"{group}", slider)

        self.outline_box = QCheckBox("nuclei as outlines")
        self.outline_box.setToolTip(
            "Draw nuclei as 2 px contours so the chromatin stays visible (slower on huge views)"
        )
        self.outline_box.toggled.connect(self._apply_outlines)
        opacity_form.addRow("", self.outline_box)

        self.review = ReviewPanel()
        self.review.nucleus_selected.connect(self.center_on)
        self.export_button = QPushButton("Export...")
        self.export_button.setEnabled(False)
        self.export_button.clicked.connect(self._on_export_clicked)

        form = QFormLayout()
        # In a narrow dock labels go above their fields instead of pushing them off the right.
        form.setRowWrapPolicy(QFormLayout.WrapLongRows)
        form.addRow("slide layer", self.layer_combo)
        form.addRow("model", self.model_combo)
        form.addRow("device", self.device_combo)
        form.addRow("tasks", tasks_row)
        form.addRow("mpp override", self.mpp_spin)
        self.mpp_label.setWordWrap(True)
        form.addRow("live mode", self.live_box)
        self._build_sections(form, opacity_form)

    def _build_sections(self, form: QFormLayout, opacity_form: QFormLayout) -> None:
        """The dock's collapsible sections in a vertical scroll area."""
        run = QWidget()
        col = QVBoxLayout(run)
        col.setContentsMargins(0, 0, 0, 0)
        col.addLayout(form)
        col.addWidget(self.mpp_label)  # full width: wrapped text in a form row gets cut
        col.addWidget(self.analyze_button)
        col.addWidget(self.progress)
        col.addWidget(self.status)
        overlays = QWidget()
        overlays.setLayout(opacity_form)
        review = QWidget()
        col = QVBoxLayout(review)
        col.setContentsMargins(0, 0, 0, 0)
        col.addWidget(self.review)
        col.addWidget(self.export_button)
        self.teach = TeachPanel(
            self.viewer,
            self._show_taught,
            analyse_cells=self._analyse_cells,
            slide_shape=lambda: None if self._frame is None else self._frame.shape,
        )
        self.explain = ExplainPanel(self.viewer, self._explain_inputs, title=None)

        inner = QWidget()
        self._sections = QVBoxLayout(inner)
        self._sections.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        # The dock is narrow: wrap and shrink rather than scroll sideways.
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        # One line per section, top to bottom.
        self.add_section("Analyse", run)
        self.add_section("Overlay opacity", overlays)
        self.add_section("Review and export", review)
        self.add_section("Teach tile classes", self.teach, expanded=False)
        self.add_section("Explain a spot", self.explain, expanded=False)
        self.setMinimumWidth(300)

    def add_section(self, title: str, content: QWidget, *, expanded: bool = True) -> Any:
        """Append a collapsible :class:`Section` holding ``content`` to the dock; returns it."""
        section = Section(title, content, expanded=expanded)
        self._sections.insertWidget(self._sections.count() - 1, section)  # above the stretch
        self.sections[title] = section
        return section

    # --- slide layer ---------------------------------------------------------------------
    def _candidate_layers(self) -> list[Any]:
        from napari.layers import Image

        layers = [
            lyr for lyr in self.viewer.layers if isinstance(lyr, Image) and not is_overlay(lyr)
        ]
        # Slides opened by the HistoLens reader first, then any other image.
        return sorted(layers, key=lambda lyr: 0 if "slide" in lyr.metadata else 1)

    def _refresh_layer_choices(self, *_: Any) -> None:
        current = self.layer_combo.currentText()
        names = [lyr.name for lyr in self._candidate_layers()]
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)
        self._on_layer_changed()

    def _on_layer_removed(self, event: Any) -> None:
        # forget the Slide of a removed layer (ids can be reused by new layers)
        self._slide_cache.pop(id(getattr(event, "value", None)), None)
        self._refresh_layer_choices()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt override)
        """Closing the dock stops the running analysis and live mode."""
        self.live_box.setChecked(False)
        self.explain.set_active(False)
        self._stop_worker()
        super().closeEvent(event)

    def slide_layer(self) -> Any | None:
        """The chosen slide layer, or None."""
        name = self.layer_combo.currentText()
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _on_layer_changed(self, *_: Any) -> None:
        layer = self.slide_layer()
        if layer is None:
            self.mpp_label.setText("open a slide (File > Open) to analyse it")
            return
        slide = self._slide(layer, quiet=True)
        mpp = None if slide is None else slide.mpp
        has = mpp is not None
        self.mpp_spin.setEnabled(not has)
        self.mpp_label.setText(
            f"slide: {mpp:.4f} µm/px ({slide.mpp_source})"
            if has
            else "slide has no pixel size: set the mpp override above"
        )

    def _slide(self, layer: Any, *, quiet: bool = False) -> Any | None:
        key = id(layer)
        if key not in self._slide_cache:
            try:
                self._slide_cache[key] = slide_for_layer(layer)
            except Exception as exc:  # noqa: BLE001 (reported, never a traceback dialog)
                if not quiet:
                    show_error(f"HistoLens: cannot read slide layer {layer.name!r}: {exc}")
                return None
        return self._slide_cache[key]

    # --- analysis ------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def _on_analyze_clicked(self) -> None:
        if self.running:
            self.cancel()
        else:
            self.analyze_view()

    def _capture(self) -> tuple[AnalysisRequest, LayerFrame] | None:
        """Read the controls and the camera (main thread); None, with a message, if unusable."""
        layer = self.slide_layer()
        if layer is None:
            show_warning(
                "HistoLens: no slide layer; open a slide first (File > Open, or the sample)"
            )
            return None
        slide = self._slide(layer)
        if slide is None:
            return None
        if slide.mpp is None:
            override = float(self.mpp_spin.value())
            if override <= 0:
                show_warning(
                    f"HistoLens: {layer.name!r} has no pixel size (mpp); set 'mpp override' "
                    "in the HistoLens dock to its µm per level-0 pixel"
                )
                return None
            slide = slide.with_mpp(override)
        frame = LayerFrame.from_layer(layer)
        region = view_region(CameraState.from_viewer(self.viewer), frame)
        if region.is_empty:
            show_warning("HistoLens: the view does not show the slide; pan or reset the view")
            return None
        tasks = tuple(task for task in ALL_TASKS if self.task_boxes[task].isChecked())
        if not tasks:
            show_warning("HistoLens: tick at least one task (nuclei, tile classes, attention)")
            return None
        device = self.device_combo.currentText()
        self._stamp += 1
        request = AnalysisRequest(
            stamp=self._stamp,
            slide=slide,
            region=region,
            model_name=self.model_combo.currentText() or None,
            device=None if device == "auto" else device,
            tasks=tasks,
        )
        return request, frame

    def analyze_view(self) -> AnalysisRequest | None:
        """Analyse exactly the region on screen; a running analysis is cancelled (latest wins)."""
        captured = self._capture()
        if captured is None:
            return None
        try:
            preload_model_stack()
        except Exception as exc:  # noqa: BLE001
            show_error(f"HistoLens needs torch and timm to analyse: {type(exc).__name__}: {exc}")
            return None
        self._stop_worker()
        request, frame = captured
        self._request, self._frame = request, frame
        worker = create_worker(analysis_job, request, self._models, _ignore_errors=True)
        stamp = request.stamp
        worker.yielded.connect(lambda item: self._on_yielded(stamp, item))
        worker.returned.connect(lambda outcome: self._on_returned(stamp, outcome))
        worker.errored.connect(lambda exc: self._on_errored(stamp, exc))
        worker.finished.connect(lambda: self._on_finished(stamp))
        self._worker = worker
        self.analyze_button.setText(CANCEL)
        self.progress.setRange(0, 0)  # busy until the first tile reports the total
        r = request.region
        self.status.setText(f"analysing {r.width} x {r.height} px at ({r.y0}, {r.x0}) ...")
        worker.start()
        return request

    def cancel(self) -> None:
        """Stop the running analysis after the current tile batch; the layers keep the tiles done.

        Only the engine's cancel event is set (no ``worker.quit()``): the engine then ends
        with one last result holding every finished tile, so layers and review agree.
        """
        if self._request is not None:
            self._request.cancel.set()
            self.status.setText("cancelling after the current tiles ...")

    def _stop_worker(self) -> None:
        # The old worker finishes in the background; its signals carry an old stamp and are
        # dropped, so only the latest request ever touches the layers.
        if self._request is not None:
            self._request.cancel.set()
        if self._worker is not None:
            self._worker.quit()
        self._worker = None
        self._pending = None

    def _on_yielded(self, stamp: int, item: tuple[int, RegionResult]) -> None:
        if stamp != self._stamp:
            return
        _stamp, partial = item
        total, done = max(partial.tiles_total, 1), partial.tiles_done
        self.progress.setRange(0, total)
        self.progress.setValue(min(done, total))
        self.progress.setFormat(progress_text(partial.provenance))
        # Several tiles may land per frame; paint the newest at most every PARTIAL_REFRESH_MS.
        scheduled = self._pending is not None
        self._pending = partial
        if not scheduled:
            QTimer.singleShot(PARTIAL_REFRESH_MS, lambda: self._flush(stamp))

    def _flush(self, stamp: int) -> None:
        if stamp != self._stamp or self._pending is None:
            return
        partial, self._pending = self._pending, None
        self._show(partial, final=False)

    def _on_returned(self, stamp: int, outcome: JobOutcome) -> None:
        if stamp != self._stamp:
            return
        self._pending = None
        if outcome.result is not None:
            self._show(outcome.result, final=True)
        for text in outcome.warnings[:3]:
            show_warning(f"HistoLens: {text}")

    def _on_errored(self, stamp: int, exc: BaseException) -> None:
        if stamp != self._stamp:
            return
        show_error(f"HistoLens could not analyse the view: {type(exc).__name__}: {exc}")
        self.status.setText(f"error: {exc}")

    def _on_finished(self, stamp: int) -> None:
        if stamp != self._stamp:
            return
        if self._pending is not None:  # cancelled between a yield and its repaint
            partial, self._pending = self._pending, None
            self._show(partial, final=True)
        elif self.result is not None and self.result.region == self.region():
            self.review.show_result(self.result, fill_table=True)
        self._worker = None
        self.analyze_button.setText(ANALYZE)
        self.progress.setFormat("%v / %m tiles")
        if self.progress.maximum() == 0:
            self.progress.setRange(0, 1)
        if self.result is not None:
            p = self.result.provenance
            cancelled = self._request is not None and self._request.cancel.is_set()
            state = "complete" if self.result.complete and not cancelled else "cancelled"
            self.status.setText(
                f"{state}: {p.tiles_done}/{p.tiles_total} tiles, {p.model_name} on {p.device}"
            )

    def _show(self, result: RegionResult, *, final: bool) -> None:
        """Put ``result`` on the viewer (main thread) and in the review panel."""
        frame = self._frame
        if frame is None:
            return
        result = self.teach.apply(result, final=final)
        try:
            update_overlays(
                self.viewer,
                result_to_layer_data(result),
                mpp=result.slide_mpp,
                frame=frame,
                opacity=self.opacities(),
                prune=final and result.complete,
            )
        except Exception as exc:  # noqa: BLE001 (a notification, never a frozen UI)
            show_error(f"HistoLens could not draw the result: {type(exc).__name__}: {exc}")
            return
        self.result = result
        if self.outline_box.isChecked():
            self._apply_outlines()
        self.review.show_result(result, fill_table=final)
        self.export_button.setEnabled(True)
        if final:
            self.teach.place_layer()

    def _analyse_cells(self, region: Region, on_done: Any) -> Any | None:
        """Tile task only on ``region`` (cells marked outside the view) with the shown view's
        slide and model, in a worker; ``on_done(result or None)`` on the main thread."""
        request = self._request
        if request is None:
            on_done(None)
            return None
        worker = create_worker(tiles_job, request, region, self._models, _ignore_errors=True)
        worker.returned.connect(on_done)

        def failed(exc: BaseException) -> None:
            show_error(f"HistoLens could not analyse the marked cells: {exc}")
            on_done(None)

        worker.errored.connect(failed)
        self._side_workers.add(worker)  # referenced until finished, or Qt may drop its signals
        worker.finished.connect(lambda: self._side_workers.discard(worker))
        worker.start()
        return worker

    def _show_taught(self, result: RegionResult) -> None:
        """Redraw only what taught tile classes change: the tile layer, legend and exports."""
        if self._frame is None:
            return
        update_overlays(
            self.viewer,
            result_to_layer_data(result, names=["tile classes"]),
            mpp=result.slide_mpp,
            frame=self._frame,
            opacity=self.opacities(),
        )
        self.result = result
        self.review.show_result(result, fill_table=False)

    # --- live mode -------------------------------------------------------------------------
    def _on_view_changed(self, *_: Any) -> None:
        if self.live_box.isChecked():
            self._live_trigger()

    def _on_view_settled(self) -> None:
        if not self.live_box.isChecked():
            return
        layer = self.slide_layer()
        if layer is None:
            return
        region = view_region(CameraState.from_viewer(self.viewer), LayerFrame.from_layer(layer))
        last = self._request.region if self._request is not None else None
        if region == last and (self.running or (self.result is not None and self.result.complete)):
            return  # same view: nothing new to analyse
        self.analyze_view()

    def _on_live_toggled(self, on: bool) -> None:
        if on:
            self._on_view_settled()
        else:
            self._live_trigger.cancel()

    # --- overlays, review, export ----------------------------------------------------------
    def opacities(self) -> dict[str, float]:
        """Opacity per overlay group, from the dock's sliders (0..1)."""
        return {g: s.value() / 100.0 for g, s in self.opacity_sliders.items()}

    def _set_opacity(self, group: str, value: float) -> None:
        for layer in self.viewer.layers:
            name = layer.metadata.get("histolens_overlay", "")
            if is_overlay(layer) and overlay_group(name) == group:
                layer.opacity = value

    def _apply_outlines(self, *_: Any) -> None:
        # napari draws Labels filled by default (contour=0), fastest for big label images
        # (napari#8582); outlines are the reviewer's choice.
        for layer in self.viewer.layers:
            if layer.metadata.get("histolens_overlay") == "nuclei":
                layer.contour = 2 if self.outline_box.isChecked() else 0

    def center_on(self, y: float, x: float) -> None:
        """Centre the view on level-0 pixel ``(y, x)`` of the slide layer (a nucleus centroid)."""
        layer = self.slide_layer()
        if layer is None:
            return
        cy, cx = level0_to_world((y, x), LayerFrame.from_layer(layer))
        camera = self.viewer.scene.camera
        center = tuple(camera.center)
        camera.center = (*center[:-2], cy, cx)

    def _on_export_clicked(self) -> None:
        if self.result is None:
            return
        folder = QFileDialog.getExistingDirectory(self, "Export HistoLens result to a folder")
        if folder:
            self.export_to(folder)

    def export_to(self, folder: str) -> Any | None:
        """Write the shown result with :func:`histolens.export.write_result` into ``folder``.

        Runs in a worker (masks and the overview PNG take a moment on big views); returns it.
        """
        if self.result is None:
            show_warning("HistoLens: nothing to export yet; click 'Analyze view' first")
            return None
        layer = self.slide_layer()
        slide = self._slide(layer, quiet=True) if layer is not None else None
        worker = create_worker(export_job, self.result, folder, slide, _ignore_errors=True)
        worker.returned.connect(
            lambda paths: show_info(f"HistoLens: wrote {len(paths)} files to {folder}")
        )
        worker.errored.connect(
            lambda exc: show_error(
                f"HistoLens could not export to {folder}: {type(exc).__name__}: {exc}"
            )
        )
        self.export_button.setEnabled(False)
        worker.finished.connect(lambda: self.export_button.setEnabled(self.result is not None))
        worker.start()
        return worker

    def _explain_inputs(self) -> ExplainInputs | None:
        """The analysed slide, result, frame and model an Explain click reads (None before)."""
        request, result, frame = self._request, self.result, self._frame
        if request is None or result is None or frame is None:
            return None
        if str(getattr(request.slide, "name", "")) != result.provenance.slide_name:
            return None  # a new slide is being analysed; its result is not shown yet
        device = self.device_combo.currentText()
        name = result.provenance.model_name
        model = partial(self._models.get, name, None if device == "auto" else device)
        return ExplainInputs(request.slide, result, frame, model)

    def region(self) -> Region | None:
        """The level-0 region of the request shown or running (None before the first)."""
        return None if self._request is None else self._request.region
