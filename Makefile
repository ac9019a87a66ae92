PY ?= python3

.PHONY: setup test lint example

setup:
	PYTHON=$(PY) bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q
	$(PY) -m ruff check adapterops tests bench scripts
	$(PY) -m ruff format --check adapterops tests bench scripts
	$(PY) -m mypy

example: setup
	bash scripts/example.sh
