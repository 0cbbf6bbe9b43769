# Two commands for a fresh machine with Python 3.11+ and pip: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# Reinstall when the declared dependencies or the pinned versions change.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -c "import jax, jax.numpy as jnp; from hpllm import Transformer, preset; \
	cfg = preset('small'); m = Transformer(cfg, key=jax.random.key(0)); \
	logits = m(jnp.zeros((1, 16), jnp.int32)); \
	print(f'small preset: {cfg.n_params:,} parameters, logits {logits.shape}')"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
