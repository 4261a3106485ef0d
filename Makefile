# priorzoo: the two commands the README promises, plus lint.
#   make demo   set up, then run the main job (`priorzoo demo`) offline on its embedded default
#   make test   set up, lint (ruff check, ruff format --check), then run the test suite (what .ci/run calls)
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: setup demo test lint format

setup:
	$(PIP) install -q -c constraints.txt -e ".[all,dev]"
	$(PYTHON) tools/torchvision_shim.py install

# one OpenMP thread, as the tests run: on a busy 2-core machine two threads spin against other processes
# (the demo measured 36 min instead of 3.6); each phase of the demo shows its own progress bar
demo: setup
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 priorzoo demo

test: setup lint
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff format . && $(PYTHON) -m ruff check --fix .
