# hf_spectralkd: every target creates the virtual environment first if it is missing.
#   make demo      offline SpectralKD demo on MNIST digits (2 CPU cores, a few minutes)
#   make demo STUDENT=widelast  (or make demo-widelast) the same demo with a WideLast student
#   make demo TEACHER=cnn       the demo with a CNN teacher (timm test_resnet), feature pairs across token grids
#   make test      the test suite (offline)
#   make dynamics  SpectralKD vs no-KD student: whose spectral profile is closer to the teacher's
#   make bench     training-step and data-pipeline benchmarks (see bench/README.md)
#   make ablation  no KD / soft KD / SpectralKD / feature MSE on the demo, 3 seeds: table + plot (≤ 15 min)
#   make lint      ruff (pyflakes, bugbear, import order; settings in pyproject.toml)
#   make test-fast the suite without the tests marked slow (10 s or more each)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# pytest-xdist workers for make test: one per core of the 2-core CI machine (each computes on one thread)
TEST_WORKERS ?= 2
# make demo STUDENT=widelast: the demo with the WideLast student (last block widened to the teacher's width)
# make demo TEACHER=cnn: the ViT student from a CNN teacher (its maps on other grids than the student's)
STUDENT ?= vit
TEACHER ?= vit
DEMO_CONFIG_vit_vit      := demo
DEMO_CONFIG_widelast_vit := demo_widelast
DEMO_CONFIG_vit_cnn      := demo_cnn
DEMO_CONFIG = $(or $(DEMO_CONFIG_$(STUDENT)_$(TEACHER)),$(error STUDENT=$(STUDENT) TEACHER=$(TEACHER): expected STUDENT=vit or widelast with TEACHER=vit, or TEACHER=cnn with STUDENT=vit))

.PHONY: install demo demo-widelast test test-fast lint dynamics ablation bench clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "setuptools>=70" wheel
	# torch/torchvision first, pinned: deepspeed builds against the installed torch.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev,deepspeed]"
	touch $(STAMP)

install: $(STAMP)

# The installed command with a shipped config: what `pip install` users run (hf-spectralkd distill demo).
demo: $(STAMP)
	$(OFFLINE) $(VENV)/bin/hf-spectralkd distill $(DEMO_CONFIG)

demo-widelast: $(STAMP)
	$(OFFLINE) $(VENV)/bin/hf-spectralkd distill $(DEMO_CONFIG_widelast_vit)

test: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -n $(TEST_WORKERS) tests

test-fast: $(STAMP)
	$(OFFLINE) $(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check hf_spectralkd recipes tests bench

ablation: $(STAMP)
	$(OFFLINE) $(VENV)/bin/hf-spectralkd ablate demo --output_dir outputs/ablation

dynamics: $(STAMP)
	$(OFFLINE) $(PY) recipes/run_dynamics.py

bench: $(STAMP)
	$(PY) bench/step.py
	$(PY) bench/data.py

clean:
	rm -rf outputs .pytest_cache .hypothesis build *.egg-info
