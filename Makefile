# `make test` and `make demo` set everything up on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo real lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) scripts/demo.py

# the general small model on real recordings: Debian corpus -> mdct latents -> configs/real.yaml -> held-out scores
real: $(STAMP)
	$(PY) scripts/build_corpus.py --out data/corpus
	$(PY) scripts/precompute_latents.py --config real.yaml --data data/corpus/train.txt --out data/corpus/latents-mdct
	$(PY) scripts/train.py --config real.yaml --resume auto
	$(PY) scripts/evaluate.py --checkpoint runs/real --max-files 24 --max-seconds 6 --json runs/real/eval.json \
	    --data speech=data/corpus/heldout-speech.txt music=data/corpus/heldout-music.txt

lint: $(STAMP)
	$(PY) -m ruff check jat scripts tests

clean:
	rm -rf $(VENV) runs .pytest_cache
