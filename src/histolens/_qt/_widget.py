"""``HistoLensWidget``: the dock that analyses the view and shows aligned overlays.

Thin by design: it assembles collapsible sections and wires them together. The form is
:mod:`._controls` (read once per request as a frozen ``DockSettings``), the worker thread with
its latest-wins stamps, repaint throttle and progress bar is :mod:`._runner`, the camera is
:mod:`._viewport`; each result goes to :func:`._overlays.update_overlays` and the
:class:`._review.ReviewPanel` on the main thread. Teach and Explain are sections of their own
(:mod:`._teach`, :mod:`._explain`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QFileDialog,
    QLabel,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QToolButton,
    QVBoxLayout,
    QWidget,
)
from superqt.utils import qdebounced

from histolens.layers import result_to_layer_data
from histolens.region import Region
from histolens.result import RegionResult

from ._controls import AnalysisControls, DockSettings, OverlayControls
from ._explain import ExplainInputs, ExplainPanel
from ._overlays import is_overlay, overlay_group, update_overlays
from ._review import ReviewPanel
from ._runner import AnalysisRunner, RunProgress
from ._slides import slide_for_layer
from ._teach import TeachPanel
from ._viewport import CameraState, LayerFrame, level0_to_world, view_region
from ._worker import AnalysisRequest, ModelCache, export_job, preload_model_stack, tiles_job

__all__ = ["HistoLensWidget", "Section"]

ANALYZE, CANCEL = "Analyze view", "Cancel"
LIVE_DEBOUNCE_MS = 500


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
        self.header.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.header.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.header.setStyleSheet("QToolButton { border: none; font-weight: bold; }")
        self.header.toggled.connect(self._on_toggled)
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 4)
        col.addWidget(self.header)
        col.addWidget(content)
        self.header.setChecked(expanded)
        self._on_toggled(expanded)

    def _on_toggled(self, on: bool) -> None:
        self.header.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)
        self.content.setVisible(on)

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
        self._frame: LayerFrame | None = None  # slide-layer frame of the latest request
        self._slide_cache: dict[int, Any] = {}
        self.sections: dict[str, Section] = {}
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
        if self.controls.select_model(name):
            show_warning(
                f"HistoLens: {name!r} has no trained weights here; its nuclei and classes "
                "are not meaningful"
            )

    # --- construction ------------------------------------------------------------------
    def _build(self) -> None:
        """The dock's collapsible sections, top to bottom, in a vertical scroll area."""
        inner = QWidget()
        self._sections = QVBoxLayout(inner)
        self._sections.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        # The dock is narrow: wrap and shrink rather than scroll sideways.
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(inner)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)
        self.add_section("Analyse", self._build_analyse())
        self.add_section("Overlay opacity", self._build_overlays())
        self.add_section("Review and export", self._build_review())
        self.teach = TeachPanel(
            self.viewer,
            self._show_taught,
            analyse_cells=self._analyse_cells,
            slide_shape=lambda: None if self._frame is None else self._frame.shape,
        )
        self.add_section("Teach tile classes", self.teach, expanded=False)
        self.explain = ExplainPanel(self.viewer, self._explain_inputs, title=None)
        self.add_section("Explain a spot", self.explain, expanded=False)
        self.setMinimumWidth(300)

    def _build_analyse(self) -> QWidget:
        """The form, the Analyze/Cancel button, the progress bar and the status line."""
        self.controls = AnalysisControls()
        try:
            self.controls.fill_models()
        except Exception as exc:  # noqa: BLE001 (the dock must open to report it)
            show_error(f"HistoLens: could not list models ({exc})")
        self.controls.layer_changed.connect(self._on_layer_changed)
        self.controls.live_toggled.connect(self._on_live_toggled)
        c = self.controls  # its widgets, under the names scripts and tests use
        self.model_combo, self.device_combo = c.model_combo, c.device_combo
        self.mpp_spin, self.mpp_label, self.live_box = c.mpp_spin, c.mpp_label, c.live_box
        self.analyze_button = QPushButton(ANALYZE)
        self.analyze_button.clicked.connect(self._on_analyze_clicked)
        self.progress = RunProgress()
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.runner = AnalysisRunner(self._models, self.progress, parent=self)
        self.runner.result_ready.connect(lambda result, final: self._show(result, final=final))
        self.runner.warned.connect(self._on_run_warned)
        self.runner.failed.connect(self._on_run_failed)
        self.runner.finished.connect(self._on_run_finished)
        run = QWidget()
        col = QVBoxLayout(run)
        col.setContentsMargins(0, 0, 0, 0)
        for widget in (self.controls, self.analyze_button, self.progress, self.status):
            col.addWidget(widget)
        return run

    def _build_overlays(self) -> QWidget:
        overlays = OverlayControls()
        overlays.opacity_changed.connect(self._set_opacity)
        overlays.outlines_toggled.connect(self._apply_outlines)
        self.opacity_sliders, self.outline_box = overlays.sliders, overlays.outline_box
        self.overlay_controls = overlays
        return overlays

    def _build_review(self) -> QWidget:
        self.review = ReviewPanel()
        self.review.nucleus_selected.connect(self.center_on)
        self.export_button = QPushButton("Export...")
        self.export_button.setEnabled(False)
        self.export_button.clicked.connect(self._on_export_clicked)
        review = QWidget()
        col = QVBoxLayout(review)
        col.setContentsMargins(0, 0, 0, 0)
        col.addWidget(self.review)
        col.addWidget(self.export_button)
        return review

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
        self.controls.set_layer_names([lyr.name for lyr in self._candidate_layers()])
        self._on_layer_changed()

    def _on_layer_removed(self, event: Any) -> None:
        # forget the Slide of a removed layer (ids can be reused by new layers)
        self._slide_cache.pop(id(getattr(event, "value", None)), None)
        self._refresh_layer_choices()

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt override)
        """Closing the dock stops the running analysis and live mode."""
        self.live_box.setChecked(False)
        self.explain.set_active(False)
        self.runner.stop()
        super().closeEvent(event)

    def slide_layer(self) -> Any | None:
        """The chosen slide layer, or None."""
        name = self.controls.settings().layer_name
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def _on_layer_changed(self, *_: Any) -> None:
        layer = self.slide_layer()
        if layer is None:
            self.controls.show_no_slide()
            return
        slide = self._slide(layer, quiet=True)
        mpp = None if slide is None else slide.mpp
        self.controls.show_slide_mpp(mpp, "" if mpp is None else slide.mpp_source)

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
        return self.runner.running

    def _on_analyze_clicked(self) -> None:
        if self.running:
            self.cancel()
        else:
            self.analyze_view()

    def _capture(self) -> tuple[DockSettings, Any, Region, LayerFrame] | None:
        """Read the form and the camera (main thread): settings, slide (with the mpp override
        applied), level-0 view region and layer frame; None, with a message, if unusable."""
        settings = self.controls.settings()
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
            if settings.mpp_override is None:
                show_warning(
                    f"HistoLens: {layer.name!r} has no pixel size (mpp); set 'mpp override' "
                    "in the HistoLens dock to its µm per level-0 pixel"
                )
                return None
            slide = slide.with_mpp(settings.mpp_override)
        frame = LayerFrame.from_layer(layer)
        region = view_region(CameraState.from_viewer(self.viewer), frame)
        if region.is_empty:
            show_warning("HistoLens: the view does not show the slide; pan or reset the view")
            return None
        if not settings.tasks:
            show_warning("HistoLens: tick at least one task (nuclei, tile classes, attention)")
            return None
        return settings, slide, region, frame

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
        settings, slide, region, frame = captured
        request = self.runner.start(settings, slide, region)
        self._frame = frame
        self.analyze_button.setText(CANCEL)
        r = request.region
        self.status.setText(f"analysing {r.width} x {r.height} px at ({r.y0}, {r.x0}) ...")
        return request

    def cancel(self) -> None:
        """Stop the running analysis after the current tile batch; the layers keep the tiles done."""
        if self.runner.cancel():
            self.status.setText("cancelling after the current tiles ...")

    def _on_run_warned(self, texts: tuple[str, ...]) -> None:
        for text in texts[:3]:
            show_warning(f"HistoLens: {text}")

    def _on_run_failed(self, exc: BaseException) -> None:
        show_error(f"HistoLens could not analyse the view: {type(exc).__name__}: {exc}")
        self.status.setText(f"error: {exc}")

    def _on_run_finished(self, held_back: RegionResult | None) -> None:
        if held_back is not None:  # cancelled between a yield and its repaint
            self._show(held_back, final=True)
        elif self.result is not None and self.result.region == self.region():
            self.review.show_result(self.result, fill_table=True)
        self.analyze_button.setText(ANALYZE)
        if self.result is not None:
            p = self.result.provenance
            request = self.runner.request
            cancelled = request is not None and request.cancel.is_set()
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
        request = self.runner.request
        if request is None:
            on_done(None)
            return None
        worker = self.runner.side_job(tiles_job, request, region, self._models)
        worker.returned.connect(on_done)

        def failed(exc: BaseException) -> None:
            show_error(f"HistoLens could not analyse the marked cells: {exc}")
            on_done(None)

        worker.errored.connect(failed)
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
        if self.controls.settings().live:
            self._live_trigger()

    def _on_view_settled(self) -> None:
        if not self.controls.settings().live:
            return
        layer = self.slide_layer()
        if layer is None:
            return
        region = view_region(CameraState.from_viewer(self.viewer), LayerFrame.from_layer(layer))
        if region == self.region() and (
            self.running or (self.result is not None and self.result.complete)
        ):
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
        return self.overlay_controls.opacities()

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
                layer.contour = 2 if self.overlay_controls.outlines else 0

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
        worker = self.runner.side_job(export_job, self.result, folder, slide)
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
        request, result, frame = self.runner.request, self.result, self._frame
        if request is None or result is None or frame is None:
            return None
        if str(getattr(request.slide, "name", "")) != result.provenance.slide_name:
            return None  # a new slide is being analysed; its result is not shown yet
        name = result.provenance.model_name
        model = partial(self._models.get, name, self.controls.settings().device)
        return ExplainInputs(request.slide, result, frame, model)

    def region(self) -> Region | None:
        """The level-0 region of the request shown or running (None before the first)."""
        request = self.runner.request
        return None if request is None else request.region
