PY ?= python3

.PHONY: setup test test-lowest lint example

setup:
	PYTHON=$(PY) bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q
	$(PY) -m ruff check adapterops tests bench scripts
	$(PY) -m ruff format --check adapterops tests bench scripts
	$(PY) -m mypy

# the sdist and wheel, built and checked, then the suite from the sdist at the lowest declared versions
test-lowest:
	PYTHON=$(PY) bash scripts/lowest_versions.sh

example: setup
	bash scripts/example.sh
