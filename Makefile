# Every target sets itself up: `make setup` is idempotent and a no-op once .venv is complete.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: setup test test-quick demo tables smoke bench bench-ddp bench-uninet gpu-check bench-two-halves clean-venv

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests -q

test-quick: setup
	$(PY) -m pytest tests -q -m "not slow"

demo: setup
	$(PY) scripts/demo.py

tables: setup
	$(PY) -m results.collect --work-dirs work_dirs --out results/tables

smoke: setup
	$(PY) -m slurm.submit experiments/smoke --cluster local && $(PY) -m slurm.status experiments/smoke

bench: setup
	$(PY) benchmarks/bench_optim.py

bench-ddp: setup
	$(PY) benchmarks/bench_ddp.py

bench-uninet: setup
	$(PY) benchmarks/bench_uninet.py

gpu-check: setup
	$(PY) scripts/gpu_check.py

bench-two-halves: setup
	$(PY) benchmarks/bench_two_halves.py

clean-venv:
	rm -rf .venv
