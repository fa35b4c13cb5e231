# dinov3geo: two set-up commands, `make demo` and `make test`. Both create .venv when missing and install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dinov3geo-installed
PYTEST_ARGS ?=

.PHONY: install browser demo test lint docs bench gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Run the whole workflow on the bundled data in data/ (pipelines/demo.yaml; outputs and report in outputs/demo/).
## Re-running skips the stages that are up to date.
demo: install
	$(VENV)/bin/dinov3geo run pipelines/demo.yaml --summary
	@echo "report: outputs/demo/report.html (open it in a browser; links go to the COG/GeoPackage outputs)"

## Headless Chromium for the report tests (Debian's package, installed when missing and we are root with apt;
## otherwise those tests say why they skip).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "installing Debian's chromium for the report tests"; \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	      echo "warning: could not install chromium; the report tests will skip"; \
	    else echo "note: chromium not found (apt-get install chromium); the report tests will skip"; fi; }

## Run the test suite (CI: .ci/run). Slow tests are excluded; run them with `make test PYTEST_ARGS="-m slow"`.
test: install browser
	$(VENV)/bin/ruff check dinov3geo tests benchmarks
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check dinov3geo tests benchmarks

## Build the documentation site into site/ (mkdocs-material + mkdocstrings API reference + the notebooks as
## saved; --strict: any warning is an error, as in tests/test_docs.py). Open site/index.html.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict
	@echo "docs: site/index.html"

## On a CUDA machine: the GPU readiness check (CUDA tests, region mapping, torchgeo way, SSL step, data path) in
## under 8 minutes; prints a table and writes gpu_check.json (benchmarks/README.md). No install step, so it also
## runs where nothing can be downloaded: `make gpu-check PY=python3` uses that interpreter instead of $(VENV).
gpu-check:
	$(PY) benchmarks/gpu_check.py --json gpu_check.json

clean:
	rm -rf outputs .pytest_cache .ruff_cache .hypothesis
