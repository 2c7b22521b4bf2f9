# Two commands do everything on a fresh machine (see README.md):
#   make demo   generate the shapes benchmark, train CondInst by its chapter's recipe (~3 min), evaluate, draw
#   make test   the whole test suite: unit, real data, engine, book build and every chapter under nbval
# Both create the virtual environment .venv inside the repository and install into it first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A torch/torchvision pair from PyPI that installs here and runs on the CPU. Colab keeps its own
# torch: there `pip install minis` is enough (pyproject.toml does not pin torch).
TORCH_PINS ?= torch==2.14.* torchvision==0.29.*
DEMO_MODEL ?= condinst
DEMO_PICTURES ?= 6
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
	$(PY) -m minis data shapes --root data/shapes_semantic --plain --max-objects 2 --size-range 0.3 0.55
	$(PY) -m minis train $(DEMO_MODEL) --recipe shapes --data shapes --data-root data/shapes_semantic \
		--eval-every 2 --out $(DEMO_OUT)
	$(PY) -m minis predict $(DEMO_OUT)/last.pt --val $(DEMO_PICTURES) --out $(DEMO_OUT)/predictions
	@echo "$(DEMO_MODEL): box AP and mask AP on the validation set above (bbox_AP, segm_AP);"
	@echo "ground truth | prediction in $(DEMO_OUT)/predictions; training curves in $(DEMO_OUT)/curves.png"

# MathJax served from the book itself, so the rendered math needs no CDN (offline builds).
mathjax: $(MATHJAX)

$(MATHJAX):
	npm install --silent --no-audit --no-fund --prefix build/npm mathjax@3
	mkdir -p book/_vendor
	rm -rf book/_vendor/mathjax
	cp -r build/npm/node_modules/mathjax/es5 book/_vendor/mathjax

book: install mathjax
	$(VENV)/bin/jupyter-book build book --warningiserror --keep-going

# The unit, real-data and engine tests run in parallel (one process per core, a test module per
# process); the chapters then run one at a time with every core, as they were saved, and pytest
# prints each chapter's time.
test: install mathjax
	$(PY) -m pytest tests --numprocesses auto --maxprocesses 4 --dist loadscope
	$(PY) -m pytest book

clean:
	rm -rf book/_build build runs
