# Set-up is automatic: the first target that needs the environment creates .venv and installs the
# package with its test extra; it reinstalls only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lightning-defense evaluate --config configs/digits/evaluate.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q
