# One venv for everything: `make artifacts` and `make test` both create it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install artifacts test lint bench verify clean serve

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

artifacts: $(STAMP)
	$(PY) -m export

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check xattn export tests

bench: $(STAMP)
	$(PY) -m export.bench --batch 1,32 --threads 1 --lengths 10,64,256 --startup

clean:
	rm -rf $(VENV) artifacts/*.onnx artifacts/*.tflite artifacts/*.keras artifacts/*.json artifacts/*.npz

verify: $(STAMP)
	$(PY) -m export.verify artifacts/

# Serves the default artifacts (built first if artifacts/ holds none) on 127.0.0.1:8000.
serve: $(STAMP)
	@ls artifacts/*.onnx.json >/dev/null 2>&1 || $(PY) -m export
	$(PY) -m export.serve artifacts/
