# The two commands a newcomer needs: `make demo` and `make test`.
# Both create/refresh the virtual environment first.
#
# torch is installed before anything else and then pinned with a constraint file that
# names the torch already installed: without it pip resolves nnunetv2's / monai's
# "torch" requirement to the newest release and pulls gigabytes of CUDA packages.
# Override TORCH to pick another build, e.g. `make test TORCH=torch==2.13.0`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pumit-installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[test]"
	$(PY) -m pumit_seg.torchvision_repair
	touch $(STAMP)

demo: install
	$(PY) -m pumit_seg.demo

test: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo_output
