# One venv for everything: `make artifacts` and `make test` both create it on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install artifacts test lint bench verify clean example

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
	$(PY) -m ruff check xattn export tests examples

bench: $(STAMP)
	$(PY) -m export.bench --batch 1,32 --threads 1 --lengths 10,64,256 --startup

# The forecasting example: train on the real CO2 data, then draw the test-split forecast.
EXAMPLE_DIR ?= build/forecast
example: $(STAMP)
	$(PY) -m examples.forecast.train --epochs 60 --output-dir $(EXAMPLE_DIR)
	$(PY) -m examples.forecast.plot --run-dir $(EXAMPLE_DIR)

clean:
	rm -rf $(VENV) artifacts/*.onnx artifacts/*.tflite artifacts/*.keras artifacts/*.json artifacts/*.npz \
		artifacts/*_savedmodel/ artifacts/*.sig artifacts/.xattn.lock artifacts/.xattn-staging-* artifacts/.xattn-trash-*

verify: $(STAMP)
	$(PY) -m export.verify artifacts/
