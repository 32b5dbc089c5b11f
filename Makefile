# Two entry points: `make run` (install + the digits demo end to end) and `make test` (install + pytest).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torchaudio installs only beside torch 2.9.1 here; torch goes first, as its own step.
TORCH  := torch==2.9.1 torchvision==0.24.1
PINS   := torchaudio==2.9.1 numpy==2.3.5 timm==1.0.31 webdataset==1.0.2 braceexpand==0.1.7 lightning==2.6.6 \
          einops==0.8.2 safetensors==0.8.0 PyYAML==6.0.3 scikit-learn==1.9.1 soundfile==0.14.0 \
          tokenizers==0.23.3 sacrebleu==2.6.0 pillow==13.0.0 triton==3.5.1 matplotlib==3.10.9 \
          fastapi==0.163.2 uvicorn==0.54.0 huggingface-hub==2.4.0
DEVPINS := pytest==9.2.0 pytest-timeout==2.4.0 pytest-xdist==3.8.0 hypothesis==6.170.15 tensorboard==2.21.0 \
           transformers==5.23.0 httpx==0.28.1 onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.31.1
CONFIG ?= configs/vision/digits.yaml

.PHONY: run test install install-dev system-deps clean

# espeak-ng synthesises the spoken-digits set; pocketsphinx-testdata holds real recordings for the tests.
# Installed with apt where that works (root on Debian); otherwise those parts say how to get them.
SYSTEM_PKGS := espeak-ng pocketsphinx-testdata
system-deps:
	@if command -v espeak-ng >/dev/null && [ -d /usr/share/pocketsphinx ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PKGS) >/dev/null) \
	  || echo "warning: could not apt-get install $(SYSTEM_PKGS); the audio data sets and tests will say so"; \
	else echo "note: install $(SYSTEM_PKGS) (apt-get) for the spoken-digits data set and the audio tests"; fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	touch $@

$(VENV)/.installed: pyproject.toml Makefile $(VENV)/.torch
	$(BIN)/pip install -q $(TORCH) $(PINS) -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q $(TORCH) $(PINS) $(DEVPINS) -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

data/digits/index.json: | $(VENV)/.installed
	$(BIN)/mmeff shards --source digits data/digits

run: install data/digits/index.json
	$(BIN)/mmeff fit $(CONFIG)
	$(BIN)/mmeff test $(CONFIG)

# One pytest worker per core (pytest-xdist): on CI's 2 cores the suite took 529 s against 794 s in one process.
test: install-dev system-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto

clean:
	rm -rf runs data lightning_logs
