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
# Console tools print progress bars and the tests read their output: UTF-8 whatever the locale (a CI
# machine's C locale would make Python decode it as ASCII).
export PYTHONUTF8 := 1

.PHONY: install demo test lint clean browser

install: $(STAMP)

# PYTHONWARNINGS: setuptools cautions in a 20-line box that every editable install uses an import hook;
# there is nothing to act on, so a newcomer's install stays quiet.
$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -W ignore -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-constraint.txt
	PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -c $(VENV)/torch-constraint.txt -e ".[test]"
	$(PY) -m pumit_seg.torchvision_repair
	touch $(STAMP)

# The whole method on built-in phantoms (pre-training, fine-tuning vs scratch, a CHAOS submission) and
# an HTML report in demo_output/report.html; run it again to resume. `pumit_demo --help` for your data.
demo: install
	$(VENV)/bin/pumit_demo --output demo_output

# Lint, the package's layers (import-linter contracts in pyproject.toml), then every test. For a quick loop
# while developing: `.venv/bin/pytest -m "not e2e"` leaves out the end-to-end runs.
test: install browser lint
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests

# The demo test checks its report in headless Chromium (Debian's package). Installed when missing and
# apt-get is usable; elsewhere that test is skipped (and fails under CI=true, which must have it).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null) || \
	  echo "warning: could not install chromium; the report's browser test will be skipped"; }

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) demo_output
