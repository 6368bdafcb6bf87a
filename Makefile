# One venv for everything: `make artifacts` and `make test` both create it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install artifacts test lint bench verify clean

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
	rm -rf $(VENV) artifacts/*.onnx artifacts/*.tflite artifacts/*.keras artifacts/*.json artifacts/*.npz artifacts/*.golden.bin

verify: $(STAMP)
	$(PY) -m export.verify artifacts/
