# Two commands do everything on a fresh machine (see README.md):
#   make demo   generate the shapes benchmark, train the baseline for ~2 min, evaluate, draw predictions
#   make test   the whole test suite: unit, real data, engine, book build and every chapter under nbval
# Both create the virtual environment .venv inside the repository and install into it first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A torch/torchvision pair from PyPI that installs here and runs on the CPU. Colab keeps its own
# torch: there `pip install minis` is enough (pyproject.toml does not pin torch).
TORCH_PINS ?= torch==2.14.* torchvision==0.29.*
DEMO_EPOCHS ?= 20
DEMO_OUT ?= runs/demo
MATHJAX := book/_vendor/mathjax/tex-chtml.js

.PHONY: demo test install book mathjax clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(word 1,$(TORCH_PINS))" "$(word 2,$(TORCH_PINS))"
	$(PY) -m pip install --quiet -e ".[dev,book]"
	touch $@

demo: install
	$(PY) -m minis data shapes --root data/shapes
	$(PY) -m minis train baseline_fcn --data shapes --data-root data/shapes \
		--epochs $(DEMO_EPOCHS) --batch-size 16 --optimizer adamw --lr 0.003 --warmup-iters 50 --out $(DEMO_OUT)
	$(PY) -m minis predict $(DEMO_OUT)/last.pt \
		data/shapes/val/images/000001.png data/shapes/val/images/000002.png \
		data/shapes/val/images/000003.png --out $(DEMO_OUT)/predictions
	@echo "Predictions drawn in $(DEMO_OUT)/predictions; curves in $(DEMO_OUT)/curves.png"

# MathJax served from the book itself, so the rendered math needs no CDN (offline builds).
mathjax: $(MATHJAX)

$(MATHJAX):
	npm install --silent --no-audit --no-fund --prefix build/npm mathjax@3
	mkdir -p book/_vendor
	rm -rf book/_vendor/mathjax
	cp -r build/npm/node_modules/mathjax/es5 book/_vendor/mathjax

book: install mathjax
	$(VENV)/bin/jupyter-book build book --warningiserror --keep-going

test: install mathjax
	$(PY) -m pytest

clean:
	rm -rf book/_build build runs
