# Two commands set up and run everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DATA ?= ../shared/data
MODEL ?= ../shared/models/ptb-llama-8l
DEMO_DB ?= demo/archopt.db
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: test demo setup clean bench

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU wheel on this disk; a looser spec would pull a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# the page's browser test drives Debian's Chromium (never a downloaded browser)
	test -x /usr/bin/chromium && test -x /usr/bin/chromedriver || \
		{ apt-get update && apt-get install -y chromium chromium-driver; }
	touch $(STAMP)

test: $(STAMP)
	ARCHOPT_REQUIRE_POSTGRES=1 $(BIN)/python -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	rm -rf demo && mkdir -p demo
	$(BIN)/archopt --db $(DEMO_DB) ingest examples/ptb-llama-8l.jsonl
	$(BIN)/archopt --db $(DEMO_DB) models
	$(BIN)/archopt --db $(DEMO_DB) archs --model ptb-llama-8l --sort ppl_wikitext2 --limit 5
	$(BIN)/archopt --db $(DEMO_DB) predictors train --model ptb-llama-8l
	@if [ -f $(MODEL)/config.json ] && [ -d $(DATA) ]; then \
	  echo "== query at 80%, then verify the best architecture for real on $(MODEL) =="; \
	  ARCHOPT_CACHE=demo/cache $(BIN)/archopt --db $(DEMO_DB) query --model ptb-llama-8l --params 80% \
	    --objectives ppl_wikitext2,ppl_ptb --top 8 --verify 1 --weights $(MODEL) --data-dir $(DATA) --device cpu; \
	else \
	  echo "($(MODEL) not found: query without the real verification)"; \
	  $(BIN)/archopt --db $(DEMO_DB) query --model ptb-llama-8l --params 80% --objectives ppl_wikitext2,ppl_ptb --top 8; \
	fi

clean:
	rm -rf $(VENV) demo build *.egg-info
