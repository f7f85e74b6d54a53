# Set-up is automatic: the first target that needs the environment creates .venv and installs the
# package with its test extra; it reinstalls only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test

# Real Fashion-MNIST idx files (Debian's dataset-fashion-mnist) for the datamodule's integration test.
$(FASHION_MNIST):
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; }

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lightning-defense evaluate --config configs/digits/evaluate.yaml

test: $(STAMP) $(FASHION_MNIST)
	$(VENV)/bin/python -m pytest -q
