# dinov3geo: two set-up commands, `make demo` and `make test`. Both create .venv when missing and install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dinov3geo-installed
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

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

## Run the test suite (CI: .ci/run). Slow tests are excluded; run them with `make test PYTEST_ARGS="-m slow"`.
test: install
	$(VENV)/bin/ruff check dinov3geo tests benchmarks
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check dinov3geo tests benchmarks

clean:
	rm -rf outputs .pytest_cache .ruff_cache .hypothesis
