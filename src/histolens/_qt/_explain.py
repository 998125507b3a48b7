"""The dock's Explain mode: click an analysed spot, see where the backbone looked across scales.

:class:`ExplainPanel` is one self-contained widget the dock inserts. With its toggle on, a
click (not a drag) on the slide runs :func:`histolens.explain.explain_point` in a thread worker
for the finest backbone token under the cursor, and shows the explanation as layers aligned
with the slide layer ("looked at (scale k)", "same scale", and "explain windows": the token's
outline and each window it read), plus the share of attention per scale (bars) and the
predictions at the spot. A new click updates those layers in place; switching the mode off
removes them; a new analysis of the view prunes them. Bad clicks only notify.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_warning
from qtpy.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from histolens.explain import PointExplanation
from histolens.layers import EXPLAIN_TAG, SCALE_COLORS, explanation_to_layer_data
from histolens.result import RegionResult

from ._overlays import update_overlays
from ._viewport import LayerFrame
from ._worker import AnalysisError

__all__ = ["ExplainInputs", "ExplainPanel"]

#: A press that moves less than this many screen pixels before release is a click, not a pan.
CLICK_SLOP_PX = 4.0
ALL_HEADS = -1


@dataclass(frozen=True)
class ExplainInputs:
    """What a click needs from the dock: the analysed slide and result, the slide layer's
    frame, and a callable returning the model (created in the worker on first use)."""

    slide: Any
    result: RegionResult
    frame: LayerFrame
    model: Callable[[], Any]


def world_to_level0(world: Any, frame: LayerFrame) -> tuple[int, int]:
    """Level-0 pixel ``(y, x)`` under world point ``world`` (napari centres pixel k at k)."""
    wy, wx = (float(v) for v in list(world)[-2:])
    return (
        math.floor((wy - frame.translate[0]) / frame.scale[0] + 0.5),
        math.floor((wx - frame.translate[1]) / frame.scale[1] + 0.5),
    )


def explain_job(inputs: ExplainInputs, point: tuple[int, int]) -> PointExplanation:
    """:func:`histolens.explain.explain_point` for a worker (RuntimeError converted: see
    :class:`._worker.AnalysisError`)."""
    from histolens.explain import explain_point

    try:
        return explain_point(inputs.slide, point, model=inputs.model(), result=inputs.result)
    except RuntimeError as exc:
        raise AnalysisError(f"{type(exc).__name__}: {exc}") from exc


class ExplainPanel(QWidget):
    """Explain-mode controls and read-out; ``inputs()`` gives the dock's analysed state.

    One self-contained widget: the dock only inserts it (``title=None`` inside a titled group).
    """

    def __init__(
        self,
        viewer: Any,
        inputs: Callable[[], ExplainInputs | None],
        parent: QWidget | None = None,
        *,
        title: str | None = "Explain",
    ) -> None:
        super().__init__(parent)
        self.viewer = viewer
        self._inputs = inputs
        self._stamp = 0
        self.explanation: PointExplanation | None = None
        self._frame: LayerFrame | None = None
        self.worker: Any = None
        #: True from a click until its layers (or its notification) are shown
        self.pending = False
        self._painting = False
        self.toggle = QCheckBox("Explain a spot (click the slide)")
        self.toggle.setToolTip(
            "Click an analysed spot: shows where the backbone token there looked at each scale "
            "(attention, not attribution)"
        )
        self.toggle.toggled.connect(self.set_active)
        self.head_spin = QSpinBox()
        self.head_spin.setRange(ALL_HEADS, ALL_HEADS)
        self.head_spin.setSpecialValueText("mean of heads")
        self.head_spin.setToolTip("attention head to paint (0 = first), or the mean of all heads")
        self.head_spin.valueChanged.connect(self._repaint)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.predictions = QLabel("")
        self.predictions.setWordWrap(True)
        self._bars = QVBoxLayout()
        self._bars.setSpacing(2)
        head_row = QHBoxLayout()
        head_row.addWidget(QLabel("head"))
        head_row.addWidget(self.head_spin, 1)
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        if title:  # None when a titled group (e.g. a collapsible section) holds the panel
            col.addWidget(QLabel(f"<b>{title}</b>"))
        col.addWidget(self.toggle)
        col.addLayout(head_row)
        col.addWidget(self.status)
        col.addLayout(self._bars)
        col.addWidget(self.predictions)
        viewer.layers.events.removed.connect(self._on_layer_removed)

    # --- mode ------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.toggle.isChecked()

    def set_active(self, on: bool) -> None:
        """Switch Explain mode; leaving it removes the explanation layers."""
        if self.toggle.isChecked() != on:
            self.toggle.setChecked(on)  # re-enters through the toggled signal
            return
        callbacks = self.viewer.mouse_drag_callbacks
        if on:
            if self._on_mouse not in callbacks:
                callbacks.append(self._on_mouse)
            self.status.setText("click an analysed spot on the slide")
        else:
            if self._on_mouse in callbacks:
                callbacks.remove(self._on_mouse)
            self._stamp += 1  # a click still computing is dropped
            self.pending = False
            self._remove_layers()
            self._clear()

    def _on_mouse(self, viewer: Any, event: Any):  # napari drag callback (a generator)
        if getattr(event, "button", 1) != 1 or getattr(event, "modifiers", ()):
            return
        start = tuple(event.position)
        zoom = float(getattr(viewer, "scene", viewer).camera.zoom)
        moved = False
        yield
        while event.type == "mouse_move":
            dy, dx = (
                float(a) - float(b) for a, b in zip(event.position[-2:], start[-2:], strict=True)
            )
            moved = moved or math.hypot(dy, dx) * zoom > CLICK_SLOP_PX
            yield
        if not moved:
            self.explain_at(start)

    # --- one click -------------------------------------------------------------------------
    def explain_at(self, world: Any) -> Any | None:
        """Explain the token under world point ``world``; returns the worker, or None (after a
        notification) when the click cannot be explained. Nothing changes in that case."""
        inputs = self._inputs()
        if inputs is None:
            show_warning(
                "HistoLens Explain: click 'Analyze view' first, then click a spot inside it"
            )
            return None
        point = world_to_level0(world, inputs.frame)
        h, w = inputs.frame.shape
        if not (0 <= point[0] < h and 0 <= point[1] < w):
            show_warning("HistoLens Explain: that click is outside the slide; click on the tissue")
            return None
        r = inputs.result.region
        if not (r.y0 <= point[0] < r.y1 and r.x0 <= point[1] < r.x1):
            show_warning(
                "HistoLens Explain: that spot was not analysed; click inside the analysed view "
                "or click 'Analyze view' here first"
            )
            return None
        self._stamp += 1
        stamp = self._stamp
        worker = create_worker(explain_job, inputs, point, _ignore_errors=True)
        worker.returned.connect(lambda e: self._on_returned(stamp, e, inputs.frame))
        worker.errored.connect(lambda exc: self._on_errored(stamp, exc))
        self.status.setText(f"explaining level-0 pixel ({point[0]}, {point[1]}) ...")
        self.worker, self.pending = worker, True
        worker.start()
        return worker

    def _on_returned(self, stamp: int, expl: PointExplanation, frame: LayerFrame) -> None:
        if stamp != self._stamp:
            return
        self.pending = False
        if not self.active:
            return
        self.explanation, self._frame = expl, frame
        self.head_spin.blockSignals(True)
        self.head_spin.setRange(ALL_HEADS, expl.heads - 1)
        self.head_spin.blockSignals(False)
        self._repaint()
        y, x = expl.point
        self.status.setText(
            f"token at ({y:.0f}, {x:.0f}), {expl.token_box.height * expl.slide_mpp:.0f} µm; "
            f"{expl.model_name}, {expl.seconds:.2f} s. Attention is not attribution."
        )
        self._show_predictions(expl)

    def _on_errored(self, stamp: int, exc: BaseException) -> None:
        if stamp != self._stamp:
            return
        self.pending = False
        if isinstance(exc, ValueError):  # bad input: says what to do
            show_warning(f"HistoLens Explain: {exc}")
        else:
            show_error(f"HistoLens could not explain that spot: {type(exc).__name__}: {exc}")
        self.status.setText("click an analysed spot on the slide")

    # --- layers and read-out ---------------------------------------------------------------
    def head(self) -> int | None:
        value = self.head_spin.value()
        return None if value == ALL_HEADS else value

    def _repaint(self, *_: Any) -> None:
        expl, frame = self.explanation, self._frame
        if expl is None or frame is None:
            return
        self._painting = True  # layers dropped here are replaced, not gone
        try:
            self._paint_layers(expl, frame)
        finally:
            self._painting = False
        self._show_shares(expl)

    def _paint_layers(self, expl: PointExplanation, frame: LayerFrame) -> None:
        """Update the explanation layers in place (napari runs a full garbage collection per
        removed layer, about 1 s here); only a scale the new click lacks is removed."""
        items = explanation_to_layer_data(expl, self.head())
        layers = update_overlays(self.viewer, items, mpp=expl.slide_mpp, frame=frame)
        for layer, (_data, meta, layer_type) in zip(layers, items, strict=True):
            if layer_type == "shapes":  # per-shape colours do not follow new data
                layer.edge_color = meta["edge_color"]
        keep = {id(layer) for layer in layers}
        for layer in [lyr for lyr in self.explain_layers() if id(lyr) not in keep]:
            self.viewer.layers.remove(layer)

    def explain_layers(self) -> list[Any]:
        """The explanation layers on the viewer."""
        return [lyr for lyr in self.viewer.layers if EXPLAIN_TAG in lyr.metadata]

    def _remove_layers(self) -> None:
        for layer in self.explain_layers():
            self.viewer.layers.remove(layer)

    def _on_layer_removed(self, *_: Any) -> None:
        if not self._painting and self.explanation is not None and not self.explain_layers():
            self._clear()  # pruned by a new analysis or removed by the user

    def _clear(self) -> None:
        self.explanation = None
        self.status.setText("click an analysed spot on the slide" if self.active else "")
        self.predictions.setText("")
        self._clear_bars()

    def _clear_bars(self) -> None:
        while self._bars.count():
            widget = self._bars.takeAt(0).widget()
            if widget is not None:
                widget.deleteLater()

    def _show_shares(self, expl: PointExplanation) -> None:
        """One bar per scale: its share of the token's attention, with the window's size."""
        self._clear_bars()
        fov = expl.field_of_view_um()
        for scale, share in expl.shares(self.head()).items():
            bar = QProgressBar()
            bar.setRange(0, 1000)
            bar.setValue(round(share * 1000))
            what = "same scale" if scale == 0 else f"scale {scale}"
            bar.setFormat(f"{what}, {fov[scale]:.0f} µm: {share:.0%}")
            color = SCALE_COLORS[scale % len(SCALE_COLORS)]
            # a light groove keeps the black text readable over the filled and empty parts
            bar.setStyleSheet(
                f"QProgressBar::chunk {{ background-color: {color}; }}"
                "QProgressBar { background-color: #e6e6e6; color: black; border: none;"
                " text-align: center; }"
            )
            self._bars.addWidget(bar)

    def _show_predictions(self, expl: PointExplanation) -> None:
        if expl.nucleus_type is not None:
            nucleus = f"{expl.nucleus_type} ({expl.nucleus_probability:.2f})"
        else:
            nucleus = "none at this spot"
        if expl.tissue_class is not None:
            ranked = sorted(expl.tissue_probabilities.items(), key=lambda kv: -kv[1])
            tissue = ", ".join(f"{n} {p:.2f}" for n, p in ranked[:3])
        else:
            tissue = "not classified (glass or not analysed)"
        self.predictions.setText(f"nucleus: {nucleus}<br>tile class: {tissue}")
