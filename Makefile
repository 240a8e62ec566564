# Two commands on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install serve test data clean

install: $(STAMP)

# torch is pinned first so that the CPU wheel on this disk satisfies the project's range
# and pip never resolves a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

serve: install
	$(VENV)/bin/leanserve serve --host $(HOST) --port $(PORT) --jobs-dir jobs

# two workers, a test file each at a time: most of the suite waits on servers and subprocesses
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

data: install
	$(VENV)/bin/leanserve data build --out data

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
