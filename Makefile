# Two commands for a fresh machine with Python 3.11+ and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-multiprocess lint clean

setup: $(STAMP)

# Reinstall when the declared dependencies or the pinned versions change.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,plot]'
	touch $(STAMP)

# The default training run (small preset, bundled corpus) into runs/demo. Run again, it resumes
# (and has nothing to do once finished) instead of refusing to overwrite the run.
demo: $(STAMP)
	$(PY) -m train --out runs/demo $$(test -d runs/demo/checkpoints && echo --resume)
	$(PY) -m infer convert runs/demo --to int8 --out runs/demo-int8 --force
	$(PY) -m infer generate runs/demo-int8 --prompt "Mr. Speaker, Members of the Congress" \
		--max-new-tokens 60 --temperature 0.8 --top-k 40 --seed 0
	@echo "chat with the model: $(PY) -m infer chat runs/demo-int8"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Test files spread over every core (pytest-xdist); the tests share one persistent XLA
# compilation cache for the session (tests/conftest.py).
test: lint
	$(PY) -m pytest -n auto --dist loadfile

# Training over several local processes on JAX's distributed runtime (tests/test_multiprocess.py).
test-multiprocess: $(STAMP)
	$(PY) -m pytest -m multiprocess

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
