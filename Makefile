# Set-up and entry points outside 3D Slicer. Everything runs in a project-local
# virtual environment (.venv); torch is pinned and installed first so that pip
# takes the CPU build that lies on this machine instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,gui]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m InvarianceExplorerLib demo --out results/demo

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen OMP_NUM_THREADS=2 $(PY) -m pytest -q Testing

clean:
	rm -rf $(VENV) results build *.egg-info
