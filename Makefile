# priorzoo: the two commands the README promises, plus lint.
#   make demo   set up, then run the main job (`priorzoo demo`) offline on its embedded default
#   make test   set up, then run the test suite (what .ci/run calls)
PYTHON ?= python
PIP ?= $(PYTHON) -m pip

.PHONY: setup demo test lint format

setup:
	$(PIP) install -q -c constraints.txt -e ".[all,dev]"
	$(PYTHON) tools/torchvision_shim.py install

demo: setup
	HF_HUB_OFFLINE=1 priorzoo demo

test: setup
	$(PYTHON) -m pytest -q

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .
