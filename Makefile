# Every target sets itself up: `make setup` is idempotent and a no-op once .venv is complete.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: setup test test-quick demo bench clean-venv

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests -q

test-quick: setup
	$(PY) -m pytest tests -q -m "not slow"

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) benchmarks/bench_optim.py

clean-venv:
	rm -rf .venv
