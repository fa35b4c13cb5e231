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

## Run the main job on the bundled data in data/ (outputs in outputs/demo/).
demo: install
	$(VENV)/bin/dinov3geo ingest data/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif \
		data/landsat/rasterio_RGB.byte.tif --bands red,green,blue --tile 128 --out outputs/demo/rgb_tiles.zarr
	$(VENV)/bin/dinov3geo ingest data/pucallpa --tile 128 --out outputs/demo/pucallpa_tiles.zarr
	$(VENV)/bin/dinov3geo info outputs/demo/rgb_tiles.zarr
	$(VENV)/bin/dinov3geo pretrain pipelines/demo_pretrain.yaml --resume
	$(VENV)/bin/dinov3geo features data/neon_bart_2019/2019_BART_5_320000_4881000_image_crop.tif \
		--weights outputs/demo/pretrain/backbone.pth --out outputs/demo/neon_features.zarr --window 512
	@echo "demo outputs in outputs/demo/: tile stores (*.zarr), pretraining run (pretrain/: checkpoints, logs,"
	@echo "backbone.pth in Meta's format), dense features (neon_features.zarr) and their PCA (neon_features_pca.png)"

## Run the test suite (CI: .ci/run). Slow tests are excluded; run them with `make test PYTEST_ARGS="-m slow"`.
test: install
	$(VENV)/bin/ruff check dinov3geo tests benchmarks
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check dinov3geo tests benchmarks

clean:
	rm -rf outputs .pytest_cache .ruff_cache .hypothesis
