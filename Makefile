# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv once and install the project into it (torch pinned to a CPU-friendly build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	rm -rf out/demo
	$(VENV)/bin/xray-lung-prep preprocess --input samples/xrays --output out/demo

test: $(VENV)/.installed
	$(PY) -m pytest -q
