# The two commands of the README. Each builds .venv first if needed (torch alone first: the pinned
# CPU wheel; anything looser pulls a multi-GB CUDA build).
PY := .venv/bin/python

.PHONY: run test venv
run: venv
	$(PY) -m glo.run

# Two workers, one thread each: the suite is mostly subprocesses, and two 2-thread torch processes on
# 2 cores would oversubscribe them.
test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

venv: .venv/.installed

.venv/.installed: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -e '.[test]'
	touch $@
