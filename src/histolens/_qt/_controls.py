"""The dock's form: what to analyse and how, read in one place as a frozen :class:`DockSettings`.

:class:`AnalysisControls` holds the analysis inputs (slide layer, model, device, tasks, mpp
override, live mode); :meth:`AnalysisControls.settings` is the only reader of those widgets, so a
request captures one consistent, immutable snapshot and later edits of the form never reach a
running analysis. :class:`OverlayControls` holds the display-only controls (opacity per overlay
group, nuclei outlines), which act on the layers at once and never start an analysis.

The widgets are plain Qt in a ``QFormLayout`` that wraps labels above their fields in a narrow
dock; magicgui's containers lay out their own labels and would change that look.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from histolens.models import ALL_TASKS

__all__ = ["AnalysisControls", "DockSettings", "OverlayControls"]

DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_OPACITY = {"nuclei": 0.6, "tile classes": 0.25, "attention": 0.4}


@dataclass(frozen=True)
class DockSettings:
    """One reading of the analysis form.

    ``layer_name`` is the chosen slide layer (None: none); ``model_name`` None means the default
    model and ``device`` None means auto (CUDA, MPS, then CPU); ``tasks`` keeps the order of
    :data:`histolens.models.ALL_TASKS`; ``mpp_override`` is the level-0 pixel size in µm/px used
    when the slide records none (None: "from slide").
    """

    layer_name: str | None
    model_name: str | None
    device: str | None
    tasks: tuple[str, ...]
    mpp_override: float | None
    live: bool


def _narrow_combo(*items: str) -> QComboBox:
    combo = QComboBox()
    combo.addItems(items)
    # long layer/model names must not widen the narrow dock
    combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(8)
    return combo


def _mpp_spin() -> QDoubleSpinBox:
    spin = QDoubleSpinBox()
    spin.setDecimals(4)
    spin.setRange(0.0, 100.0)
    spin.setSingleStep(0.05)
    spin.setSpecialValueText("from slide")  # shown at 0.0, read as "no override"
    spin.setMinimumWidth(60)
    spin.setSuffix(" µm/px")
    spin.setToolTip("Pixel size of level 0, used when the slide does not record one")
    return spin


class AnalysisControls(QWidget):
    """The "Analyse" form: slide layer, model, device, tasks, mpp override, live mode.

    Emits ``layer_changed`` when the user picks another slide layer and ``live_toggled(on)``.
    """

    layer_changed = Signal()
    live_toggled = Signal(bool)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.layer_combo = _narrow_combo()
        self.layer_combo.currentIndexChanged.connect(lambda *_: self.layer_changed.emit())
        self.model_combo = _narrow_combo()
        self.device_combo = _narrow_combo(*DEVICES)
        self.task_boxes: dict[str, QCheckBox] = {}
        tasks_row = QHBoxLayout()
        tasks_row.setSpacing(4)
        for task in ALL_TASKS:
            box = QCheckBox(task)
            box.setChecked(True)
            self.task_boxes[task] = box
            tasks_row.addWidget(box)
        self.mpp_spin = _mpp_spin()
        self.mpp_label = QLabel()
        self.mpp_label.setWordWrap(True)
        self.live_box = QCheckBox("Live")
        self.live_box.setToolTip(
            "Re-analyse the view after each pan/zoom (debounced, latest view wins)"
        )
        self.live_box.toggled.connect(self.live_toggled)

        form = QFormLayout()
        # In a narrow dock labels go above their fields instead of pushing them off the right.
        form.setRowWrapPolicy(QFormLayout.RowWrapPolicy.WrapLongRows)
        form.addRow("slide layer", self.layer_combo)
        form.addRow("model", self.model_combo)
        form.addRow("device", self.device_combo)
        form.addRow("tasks", tasks_row)
        form.addRow("mpp override", self.mpp_spin)
        form.addRow("live mode", self.live_box)
        col = QVBoxLayout(self)
        col.setContentsMargins(0, 0, 0, 0)
        col.addLayout(form)
        col.addWidget(self.mpp_label)  # full width: wrapped text in a form row gets cut

    def settings(self) -> DockSettings:
        """The form as it reads now (main thread); the one place its widgets are read."""
        device = self.device_combo.currentText()
        override = float(self.mpp_spin.value())
        return DockSettings(
            layer_name=self.layer_combo.currentText() or None,
            model_name=self.model_combo.currentText() or None,
            device=None if device == "auto" else device,
            tasks=tuple(task for task in ALL_TASKS if self.task_boxes[task].isChecked()),
            mpp_override=override if override > 0 else None,
            live=self.live_box.isChecked(),
        )

    # --- filling the form ------------------------------------------------------------------
    def fill_models(self) -> None:
        """List the models with trained weights on this machine (raises if listing fails)."""
        from histolens.models import list_models

        # An untrained architecture would paint random nuclei on the slide; the others stay
        # reachable from Python (select_model).
        self.model_combo.addItems(list_models(trained=True) or list_models())
        self.model_combo.setToolTip(
            "models with trained weights on this machine; "
            "histolens.list_models() lists every architecture"
        )

    def select_model(self, name: str) -> bool:
        """Choose the registered model ``name``, adding it when it is not listed.

        Returns True when it was added and has no trained weights here (the caller warns).
        Raises ValueError naming the registered models for an unknown ``name``.
        """
        from histolens.models import list_models

        added_untrained = False
        if self.model_combo.findText(name) < 0:
            if name not in list_models():
                msg = f"unknown model {name!r}; choose one of {list_models()}"
                raise ValueError(msg)
            self.model_combo.addItem(name)
            added_untrained = name not in list_models(trained=True)
        self.model_combo.setCurrentIndex(self.model_combo.findText(name))
        return added_untrained

    def set_layer_names(self, names: list[str]) -> None:
        """Offer ``names`` as slide layers, keeping the current one when it is still there.

        Does not emit ``layer_changed``: the caller refreshes what depends on the layer.
        """
        current = self.layer_combo.currentText()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        self.layer_combo.addItems(names)
        if current in names:
            self.layer_combo.setCurrentText(current)
        self.layer_combo.blockSignals(False)

    def show_slide_mpp(self, mpp: float | None, source: str = "") -> None:
        """Show the chosen slide's level-0 pixel size (µm/px); the override only without one."""
        self.mpp_spin.setEnabled(mpp is None)
        self.mpp_label.setText(
            f"slide: {mpp:.4f} µm/px ({source})"
            if mpp is not None
            else "slide has no pixel size: set the mpp override above"
        )

    def show_no_slide(self) -> None:
        self.mpp_label.setText("open a slide (File > Open) to analyse it")


class OverlayControls(QWidget):
    """Opacity sliders per overlay group and the nuclei-outline switch (display only).

    Emits ``opacity_changed(group, opacity 0..1)`` and ``outlines_toggled(on)``.
    """

    opacity_changed = Signal(str, float)
    outlines_toggled = Signal(bool)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.sliders: dict[str, QSlider] = {}
        form = QFormLayout(self)
        for group, value in DEFAULT_OPACITY.items():
            slider = QSlider(Qt.Orientation.Horizontal)
            slider.setRange(0, 100)
            slider.setValue(int(round(value * 100)))
            slider.valueChanged.connect(lambda v, g=group: self.opacity_changed.emit(g, v / 100.0))
            self.sliders[group] = slider
            form.addRow(group, slider)
        self.outline_box = QCheckBox("nuclei as outlines")
        self.outline_box.setToolTip(
            "Draw nuclei as 2 px contours so the chromatin stays visible (slower on huge views)"
        )
        self.outline_box.toggled.connect(self.outlines_toggled)
        form.addRow("", self.outline_box)

    def opacities(self) -> dict[str, float]:
        """Opacity per overlay group (0..1)."""
        return {g: s.value() / 100.0 for g, s in self.sliders.items()}

    @property
    def outlines(self) -> bool:
        """Whether nuclei are drawn as outlines rather than filled."""
        return self.outline_box.isChecked()
