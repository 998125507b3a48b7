# Two commands do all the set-up on a fresh Debian/Ubuntu machine (Python 3.11):
#   make run    the main job: napari with the sample slide and the HistoLens dock;
#               without a display, the same analysis written to out/demo/ with a PNG
#   make test   installs what the tests need and runs them (GUI tests under xvfb)
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTEST_ARGS ?=
SYSTEM_PACKAGES := xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 \
	libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 \
	libxcb-xfixes0 libxcb-shape0 libxcb-cursor0 libdbus-1-3 libfontconfig1

.PHONY: run test system-deps venv bench clean

system-deps:
	@if ! command -v xvfb-run >/dev/null 2>&1 || ! ldconfig -p | grep -q libEGL.so.1; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(SYSTEM_PACKAGES); \
	fi

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the pinned pair (this machine's local wheels; see README)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	# a .venv made before the move to PyQt6 still holds PyQt5, which qtpy would pick first
	$(BIN)/pip uninstall -q -y PyQt5 PyQt5-Qt5 PyQt5-sip
	touch $@

venv: $(BIN)/.installed

run: system-deps venv
	@if [ -n "$$DISPLAY" ] || [ -n "$$WAYLAND_DISPLAY" ]; then \
		$(BIN)/histolens demo; \
	else \
		$(BIN)/histolens demo --headless --out out/demo; \
	fi

test: system-deps venv
	xvfb-run -a -s "-screen 0 1600x1000x24" $(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks print ratios measured side by side in one run; quick variants, ~10 min in all.
bench: venv
	$(BIN)/python benchmarks/slide_read.py --quick
	$(BIN)/python benchmarks/backbone_scaling.py --quick
	$(BIN)/python benchmarks/inference_speed.py --sizes 1024
	$(BIN)/python benchmarks/batch_throughput.py --quick

clean:
	rm -rf $(VENV) out build dist .pytest_cache
