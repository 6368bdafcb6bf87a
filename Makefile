# One venv, installed in two steps (README, Install): `make install` / `make artifacts` install
# what exporting needs (the [build] extra: TensorFlow, Keras, tf2onnx, onnx and the runtime half);
# `make test` adds the rest ([test]: serving past the embedded engine, signing, TFLM, the example,
# the docs site, the test tools).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install artifacts test lint bench verify verify-web web-deps chromium clean example serve \
	coverage mutation cxx verify-arm arm-deps docs fusionlab-fixtures

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[build]'
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

# What needs more than exporting: the docs site (mkdocs), ruff, the example (statsmodels).
docs lint example: $(TEST_STAMP)

artifacts: $(STAMP)
	$(PY) -m export

# Chromium first (apt-get where missing): tests/test_docs_site.py opens the docs site in it, and
# fails rather than skips without it.
# TEST_JOBS pytest-xdist workers (one a core), each test file whole on one worker (--dist loadfile:
# a file's module fixtures built once, its tests in order); the workers share the builds of
# conftest's artifact_factory on disk. TEST_JOBS=0: one process, as `pytest` alone runs.
TEST_JOBS ?= 2
test: $(TEST_STAMP) cxx chromium
	CHROMIUM=$(CHROMIUM) $(PY) -m pytest $(if $(filter-out 0,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile)

# The fast tier (pytest -m fast): the pure logic (flags, the registry's refusals, exit codes,
# the manifest schema, the gate, the serving protocol's decoding): no TensorFlow, no server.
.PHONY: test-fast
test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q -m fast

# g++ compiles the C++ python -m export.tflm generates (tests/test_tflm.py); apt-get where missing.
cxx:
	@command -v g++ >/dev/null || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q g++; }

# Tests that can fail (README, Development): coverage of the whole suite, the CLI subprocesses
# counted ([tool.coverage.run] patch = subprocess), and mutation testing of the modules that
# carry the promises ([tool.mutmut]), one mutant at a time against the tests that reach it.
MUTATION_STAMP := $(VENV)/.installed-mutation
MUTATE ?= export.onnx.check* export.tflite.check* export.publish* export.runtime.manifest* export.runtime.verify* \
	xattn.layer.x__*mask*

$(MUTATION_STAMP): $(TEST_STAMP)
	$(PY) -m pip install --quiet -e '.[mutation]'
	touch $(MUTATION_STAMP)

coverage: $(MUTATION_STAMP)
	rm -f .coverage .coverage.*
	$(PY) -m coverage run -m pytest -q
	$(PY) -m coverage combine -q
	$(PY) -m coverage report

# The builds the tests share are kept in build/mutation-artifacts (made once, by unmutated code).
# One module: make mutation MUTATE='export.publish*'. MUTATION_JOBS mutants at once (one a core).
MUTATION_JOBS ?= 2
mutation: $(MUTATION_STAMP)
	XATTN_TEST_ARTIFACTS=$(CURDIR)/build/mutation-artifacts $(PY) -m mutmut run \
		--max-children $(MUTATION_JOBS) $(foreach pattern,$(MUTATE),'$(pattern)')
	$(PY) -m mutmut results

# The documentation site (mkdocs.yml, docs/): a broken link or anchor fails the build; docs/hooks.py
# generates the reference pages (CLI flags, manifest fields, exit codes) from the code.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

# The fusionlab-learn fixtures (tests/fixtures/fusionlab, docs/fusionlab.md), rewritten by
# fusionlab-learn 0.3.1 itself in its own environment (TF 2.15, numpy < 2), made once in the cache.
FUSIONLAB_ENV ?= $(XATTN_CACHE)/fusionlab-0.3.1
fusionlab-fixtures:
	PYTHON=$(PYTHON) sh tests/fixtures/fusionlab/make_env.sh $(FUSIONLAB_ENV)
	$(FUSIONLAB_ENV)/bin/python tests/fixtures/fusionlab/make_fixtures.py

lint: $(STAMP)
	$(PY) -m ruff check xattn export tests examples docs

bench: $(STAMP)
	$(PY) -m export.bench --batch 1,32 --threads 1 --lengths 10,64,256 --startup

# The forecasting example: train on the real CO2 data, export it (every format and variant,
# python -m export --model), run the test split in each runtime, draw the forecasts.
EXAMPLE_DIR ?= build/forecast
example: $(STAMP)
	$(PY) -m examples.forecast.train --epochs 60 --output-dir $(EXAMPLE_DIR)
	$(PY) -m examples.forecast.export --run-dir $(EXAMPLE_DIR)

clean:
	rm -rf $(VENV) web/node_modules artifacts/*.onnx artifacts/*.tflite artifacts/*.keras artifacts/*.json \
		artifacts/*.npz artifacts/*.golden.bin artifacts/*_savedmodel/ artifacts/*.sig artifacts/.xattn.lock \
		artifacts/.xattn-staging-* artifacts/.xattn-trash-* mutants .coverage .coverage.* build/mutation-artifacts build/arm

# Downloads and caches live outside the work tree (export/caches.py): the arm64 root file system
# and the aarch64 wheels (make verify-arm), the runtime-only venv of tests/test_runtime_install.py.
XATTN_CACHE := $(or $(XATTN_CACHE_DIR),$(if $(filter /%,$(XDG_CACHE_HOME)),$(XDG_CACHE_HOME),$(HOME)/.cache)/xattn)
.PHONY: clean-cache install-sizes
clean-cache:
	rm -rf $(XATTN_CACHE)

# README, Install: a fresh venv per extra (runtime, build, test) under the cache folder, with the
# install's time and size (pip's cache warm or not: say which when quoting the figures).
install-sizes:
	$(PYTHON) .ci/install-sizes

verify: $(STAMP)
	$(PY) -m export.verify artifacts/

# -- the JS verifier (web/): onnxruntime-node, and onnxruntime-web + LiteRT.js in headless Chromium --
# `npm ci` from web/package-lock.json. onnxruntime-node's install script would fetch CUDA
# binaries from nuget.org: skipped, its CPU binaries ship inside the npm package.
WEB_DEPS := web/node_modules/.package-lock.json
# Debian's chromium, installed with apt-get where missing (root, or sudo). Elsewhere point
# CHROMIUM at any Chromium/Chrome binary: make verify-web CHROMIUM=/path/to/chrome
CHROMIUM ?= $(firstword $(wildcard /usr/lib/chromium/chromium /usr/bin/chromium))
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Build the default artifacts only when a format the JS verifier runs is missing (`make
# artifacts` rebuilds); a folder with the ONNX set only (`python -m export.onnx`) gets the rest.
WEB_ARTIFACTS := $(addprefix artifacts/xattn_u64_h4_q10x64_kv10x64,.onnx.json .tflite.json)

web-deps: $(WEB_DEPS)

$(WEB_DEPS): web/package.json web/package-lock.json
	cd web && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
	touch $(WEB_DEPS)

chromium:
	@if [ -z "$(CHROMIUM)" ]; then \
		echo "chromium not found: apt-get install -y chromium"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; \
	fi

# One grouped target: both missing builds once.
$(WEB_ARTIFACTS) &: | $(STAMP)
	$(PY) -m export

verify-web: $(WEB_DEPS) chromium $(WEB_ARTIFACTS)
	cd web && node verify.mjs $(if $(CHROMIUM),--chromium $(CHROMIUM)) ../artifacts
	cd web && XATTN_ARTIFACTS=../artifacts node --test --test-reporter=spec test/

# Serves the default artifacts (built first if artifacts/ holds none) on 127.0.0.1:8000.
serve: $(STAMP)
	@ls artifacts/*.onnx.json >/dev/null 2>&1 || $(PY) -m export
	$(PY) -m export.serve artifacts/

# -- ARM without hardware (README, On devices): the artifacts verified under aarch64 user-mode
# emulation, -cpu max / max,sme=off / cortex-a53. qemu-user-static and mmdebstrap from apt-get where
# missing; the arm64 root file system and the aarch64 wheels are cached under
# ${XDG_CACHE_HOME:-~/.cache}/xattn/arm (XATTN_CACHE_DIR moves it; printed when used), the
# artifacts and the report in build/arm.
ARM_DIR ?= build/arm/artifacts
ARM_SET := $(ARM_DIR)/xattn_u64_h4_q10x64_kv10x64_int8cpu.tflite.json

arm-deps:
	@if ! command -v qemu-aarch64-static >/dev/null || ! command -v mmdebstrap >/dev/null; then \
		echo "qemu-aarch64-static or mmdebstrap not found: apt-get install -y qemu-user-static mmdebstrap"; \
		$(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive \
			$(SUDO) apt-get install -y -q qemu-user-static mmdebstrap; \
	fi

# The default configuration in every variant, each manifest's deployment.arm measured before
# publishing (python -m export --arm); built once, `rm -rf build/arm/artifacts` rebuilds.
# int8-cpu last, TFLite only (ONNX/ORT build their int8 for it: already there).
$(ARM_SET): | $(STAMP) arm-deps
	mkdir -p $(ARM_DIR)
	for q in none float16 dynamic-int8 int8; do \
		$(PY) -m export --quantize $$q --arm --output-dir $(ARM_DIR) -q || exit $$?; done
	$(PY) -m export.tflite --quantize int8-cpu --arm --output-dir $(ARM_DIR) -q

verify-arm: arm-deps $(ARM_SET)
	$(PY) -m export.arm $(ARM_DIR) --report build/arm/report.json
