"""The dock's parts on their own (run under ``xvfb-run -a``): the form and the runner.

The form is read once per request into a frozen :class:`DockSettings`; the runner lets only
the latest request reach the dock, whatever the older workers still send.
"""

from __future__ import annotations

import threading
from dataclasses import FrozenInstanceError
from types import SimpleNamespace

import pytest

from histolens.models import ALL_TASKS
from histolens.region import Region

pytestmark = pytest.mark.gui
pytest.importorskip("qtpy")

from histolens._qt._controls import AnalysisControls, DockSettings  # noqa: E402
from histolens._qt._runner import PARTIAL_REFRESH_MS, AnalysisRunner, RunProgress  # noqa: E402
from histolens._qt._worker import JobOutcome, ModelCache  # noqa: E402

TIMEOUT_MS = 20_000


def test_the_form_reads_as_one_frozen_settings_object(qtbot):
    controls = AnalysisControls()
    qtbot.addWidget(controls)
    controls.fill_models()
    controls.set_layer_names(["slide", "other"])
    model = controls.model_combo.currentText()
    before = controls.settings()
    assert before == DockSettings(
        layer_name="slide", model_name=model, device=None, tasks=ALL_TASKS,
        mpp_override=None, live=False,
    )  # fmt: skip

    controls.device_combo.setCurrentText("cpu")
    controls.task_boxes["attention"].setChecked(False)
    controls.mpp_spin.setValue(0.25)
    with qtbot.waitSignal(controls.live_toggled):
        controls.live_box.setChecked(True)
    controls.set_layer_names(["other", "slide"])  # the chosen layer stays chosen
    after = controls.settings()
    assert after == DockSettings(
        layer_name="slide", model_name=model, device="cpu", tasks=("nuclei", "tiles"),
        mpp_override=0.25, live=True,
    )  # fmt: skip
    # the earlier reading is a snapshot: the edits above did not reach it, nor can anything
    assert before.device is None and before.tasks == ALL_TASKS and not before.live
    with pytest.raises(FrozenInstanceError):
        after.device = "cuda"  # type: ignore[misc]


def test_slide_mpp_disables_the_override(qtbot):
    controls = AnalysisControls()
    qtbot.addWidget(controls)
    controls.show_slide_mpp(0.499, "aperio")
    assert not controls.mpp_spin.isEnabled() and "0.4990" in controls.mpp_label.text()
    controls.show_slide_mpp(None)
    assert controls.mpp_spin.isEnabled() and "override" in controls.mpp_label.text()


def _partial(stamp: int) -> SimpleNamespace:
    """What the runner reads of a partial result: tile counts and provenance."""
    prov = SimpleNamespace(tiles_done=1, tiles_total=2, timings={}, seconds=0.0)
    return SimpleNamespace(stamp=stamp, tiles_done=1, tiles_total=2, provenance=prov)


def test_runner_lets_only_the_latest_request_through(qtbot):
    gates = {1: threading.Event(), 2: threading.Event()}
    entered: list[int] = []
    yielded: list[int] = []

    def job(request, models):
        entered.append(request.stamp)
        assert gates[request.stamp].wait(TIMEOUT_MS / 1000)
        partial = _partial(request.stamp)
        yielded.append(request.stamp)
        yield request.stamp, partial
        return JobOutcome(request.stamp, partial, (f"note {request.stamp}",))

    progress = RunProgress()
    qtbot.addWidget(progress)
    runner = AnalysisRunner(ModelCache(), progress, job=job)
    shown, warned, finished = [], [], []
    runner.result_ready.connect(lambda result, final: shown.append((result.stamp, final)))
    runner.warned.connect(warned.append)
    runner.finished.connect(finished.append)
    settings = DockSettings("slide", "m", None, ("tiles",), None, False)

    first = runner.start(settings, "slide", Region(0, 0, 10, 10))
    qtbot.waitUntil(lambda: entered == [1], timeout=TIMEOUT_MS)  # its worker is running
    second = runner.start(settings, "slide", Region(0, 0, 20, 20))
    assert (first.stamp, second.stamp) == (1, 2) and runner.request is second
    assert (second.model_name, second.device, second.tasks) == ("m", None, ("tiles",))
    assert first.cancel.is_set() and not second.cancel.is_set()

    # The superseded worker yields and ends while the latest one still runs: all dropped.
    gates[1].set()
    qtbot.waitUntil(lambda: yielded == [1], timeout=TIMEOUT_MS)
    qtbot.wait(3 * PARTIAL_REFRESH_MS)
    assert runner.running and shown == [] and warned == [] and finished == []
    assert progress.maximum() == 0  # still busy: the stale tile count was not shown

    gates[2].set()
    qtbot.waitUntil(lambda: finished == [None], timeout=TIMEOUT_MS)
    assert not runner.running
    assert {stamp for stamp, _final in shown} == {2} and shown[-1] == (2, True)
    assert warned == [("note 2",)]
    assert (progress.value(), progress.maximum()) == (1, 2)
