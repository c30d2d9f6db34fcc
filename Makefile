# RobustReID developer entry points. Every target sets up .venv first (idempotent, fast when done).
PY := .venv/bin/python
FAISS_FLAG := $(if $(filter 1,$(GPU)),--gpu,)

.PHONY: setup demo test bench clean-demo

setup:
	bash scripts/setup.sh $(FAISS_FLAG)

demo: setup
	$(PY) tools/demo.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) tools/bench_eval.py
