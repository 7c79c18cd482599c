# The venv is made from pyproject.toml; every target installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: install demo test test-slow test-hf lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Train shapes_tiny on the built-in data, then caption held-out images and score them.
demo: install
	$(PY) -m capjax.train --config=shapes_tiny --workdir=runs/demo
	$(PY) -m capjax.evaluate --workdir=runs/demo --eval=attributes --split=test --show=8

# Two workers (pytest-xdist), a test file each at a time: the suite is mostly XLA compiles.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: install
	$(VENV)/bin/ruff check .

# The Hugging Face import checked against torch (the test-hf extra: torch CPU + transformers),
# and converted towers loaded through init.vision / init.lm.
test-hf: install
	$(PY) -m pip install -q -e '.[dev,test-hf]'
	$(PY) -m pytest -q tests/test_hf.py
	$(PY) -m pytest -q tests/test_clip_prefix.py tests/test_mini_vlm.py -k converted

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf runs/demo
