# Set-up and entry points outside 3D Slicer. Everything runs in a project-local
# virtual environment (.venv); torch is pinned and installed first so that pip
# takes the CPU build that lies on this machine instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
# Where pip looks for torch alone, e.g. https://download.pytorch.org/whl/cpu for the CPU build
# (from plain PyPI, torch on Linux is the CUDA build); empty: pip's usual index.
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet -e ".[dev,gui]"
	touch $(STAMP)

# The main job, headless, on the bundled sample CT: 16 invariances of the bundled CNN-10 for the
# 128^2 patch around a lung nodule (voxel 368,283 of slice 1), analysed; a new folder per run.
DEMO_OUT = results/demo/$(shell date +%Y%m%d-%H%M%S)
demo: $(STAMP)
	$(PY) -m InvarianceExplorerLib sample --model cnn10 --input Resources/SampleData/InvarianceExplorerChestLD.nrrd \
		--center 368,283,1 --count 16 --seed 0 --analyze --out $(DEMO_OUT)

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen OMP_NUM_THREADS=2 $(PY) -m pytest -q Testing

clean:
	rm -rf $(VENV) results build *.egg-info
