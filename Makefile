# hf_spectralkd: every target creates the virtual environment first if it is missing.
#   make demo      offline SpectralKD demo on MNIST digits (2 CPU cores, a few minutes)
#   make test      the test suite (offline)
#   make dynamics  SpectralKD vs no-KD student: whose spectral profile is closer to the teacher's
#   make bench     training-step and data-pipeline benchmarks (see bench/README.md)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: install demo test dynamics bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision first, pinned: deepspeed builds against the installed torch.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev,deepspeed]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(OFFLINE) $(PY) recipes/run_distill.py recipes/configs/demo.yaml

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q tests

dynamics: $(STAMP)
	$(OFFLINE) $(PY) recipes/run_dynamics.py

bench: $(STAMP)
	$(PY) bench/step.py
	$(PY) bench/data.py

clean:
	rm -rf outputs .pytest_cache .hypothesis build *.egg-info
