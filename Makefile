# Two commands set up and run everything on a fresh machine:
#   make demo   Python 3.11 and make only: no root, no browser, no network beyond the package index
#   make test   also the test packages, a throwaway PostgreSQL (pgserver) and, for the page's
#               real-browser test, Debian's Chromium (installed with apt-get when missing: root)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
TEST_STAMP := $(VENV)/.test-installed-stamp
LLAMACPP_STAMP := $(VENV)/.llamacpp-installed-stamp
# llama-cpp-python has no PyPI wheel: pip builds its bundled llama.cpp (CPU only). GGML_NATIVE=OFF
# with AVX2/FMA/F16C (ggml's defaults then) runs on any x86-64-v3 CI machine, not only the builder;
# the multimodal library, tests, examples, tools and server are not built.
LLAMACPP_VERSION := 0.3.36
LLAMACPP_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
LOG := $(VENV)/setup.log
DATA ?= ../shared/data
MODEL ?= ../shared/models/ptb-llama-8l
DEMO_DB ?= demo/archopt.db
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

ARCHOPT := ARCHOPT_CACHE=demo/cache $(BIN)/archopt --db $(DEMO_DB)

.PHONY: test demo setup test-setup browser llamacpp clean

setup: $(STAMP)

# archopt and its Python packages, quietly (the log keeps pip's output; its tail is shown on failure).
# torch==2.13.0 first: it is the CPU wheel on this disk; a looser spec would pull a CUDA build.
$(STAMP): pyproject.toml
	@echo "== set-up: a virtual environment in $(VENV) with archopt and its Python packages (first time: a few minutes; log: $(LOG))"
	@$(PYTHON) -m venv $(VENV)
	@{ $(BIN)/pip install --upgrade pip && $(BIN)/pip install torch==2.13.0 && $(BIN)/pip install -e . ; } \
		>$(LOG) 2>&1 || { tail -n 25 $(LOG); echo "set-up failed (full log: $(LOG))"; exit 1; }
	@touch $@

# llama.cpp for the GGUF tests, built from source once (pip keeps the wheel in its cache).
$(LLAMACPP_STAMP): $(STAMP)
	@echo "== test set-up: llama-cpp-python $(LLAMACPP_VERSION), its llama.cpp built from source (first time: about 8 minutes on 2 cores; log: $(LOG))"
	@CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(BIN)/pip install llama-cpp-python==$(LLAMACPP_VERSION) >>$(LOG) 2>&1 \
		|| { tail -n 25 $(LOG); echo "llama-cpp-python build failed: it needs gcc, g++ and cmake (full log: $(LOG))"; exit 1; }
	@touch $@

llamacpp: $(LLAMACPP_STAMP)

# What only the tests need: pytest, hypothesis, pgserver (PostgreSQL), selenium, lm-evaluation-harness,
# llama-cpp-python (above).
$(TEST_STAMP): $(STAMP) $(LLAMACPP_STAMP)
	@echo "== test set-up: pytest, hypothesis, pgserver, selenium, lm-eval (log: $(LOG))"
	@$(BIN)/pip install -e '.[test]' >>$(LOG) 2>&1 || { tail -n 25 $(LOG); echo "test set-up failed (full log: $(LOG))"; exit 1; }
	@touch $@

test-setup: $(TEST_STAMP) browser

# tests/test_service_page.py drives a real browser: Debian's Chromium and its driver, never a
# downloaded one. Only `make test` needs it; installing it takes root (apt-get), as in CI.
browser:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "== test set-up: Debian's chromium and chromium-driver for the page's browser test (apt-get)"; \
		apt-get update -qq && apt-get install -y -qq chromium chromium-driver >>$(LOG) 2>&1 \
			|| { tail -n 25 $(LOG); echo "apt-get install chromium chromium-driver failed (log: $(LOG))"; exit 1; }; \
	else \
		echo "make test runs tests/test_service_page.py in a real browser: install Debian's chromium and"; \
		echo "chromium-driver first (as root: apt-get install chromium chromium-driver), then run make test again"; \
		exit 1; \
	fi

test: test-setup
	ARCHOPT_REQUIRE_POSTGRES=1 ARCHOPT_REQUIRE_BROWSER=1 ARCHOPT_REQUIRE_LLAMACPP=1 $(BIN)/python -m pytest -q -p no:cacheprovider

demo:
	@echo "archopt finds the best pruned LLM for a size target. It keeps an archive of pruned architectures"
	@echo "with their measured perplexities, trains accuracy predictors on it, and searches over them for"
	@echo "the Pareto front of size against quality; --verify measures the best ones for real."
	@echo "This demo: a fresh SQLite archive of examples/ptb-llama-8l.jsonl (measurements of a small real"
	@echo "Llama), predictors, a query at 80% of its size and, when $(MODEL) is there, a real"
	@echo "verification and the pruned model written to demo/pruned-80 (offline, no GPU)."
	@echo
	@$(MAKE) --no-print-directory --silent setup
	@rm -rf demo && mkdir -p demo
	@echo "== archopt ingest examples/ptb-llama-8l.jsonl"
	@$(ARCHOPT) ingest examples/ptb-llama-8l.jsonl
	@echo; echo "== archopt models"
	@$(ARCHOPT) models
	@echo; echo "== archopt archs --model ptb-llama-8l --sort ppl_wikitext2 --limit 5"
	@$(ARCHOPT) archs --model ptb-llama-8l --sort ppl_wikitext2 --limit 5
	@echo; echo "== archopt predictors train --model ptb-llama-8l"
	@$(ARCHOPT) predictors train --model ptb-llama-8l
	@if [ -f $(MODEL)/config.json ] && [ -d $(DATA) ]; then \
	  echo; echo "== archopt query --model ptb-llama-8l --params 80% --verify 1 (measures the best one on $(MODEL))"; \
	  $(ARCHOPT) query --model ptb-llama-8l --params 80% --objectives ppl_wikitext2,ppl_ptb --top 8 \
	    --verify 1 --weights $(MODEL) --data-dir $(DATA) --device cpu || exit 1; \
	  best=$$($(ARCHOPT) archs --model ptb-llama-8l --sort ppl_wikitext2 --json | $(BIN)/python -c \
	    "import json, sys; print(next(a['arch_id'][:12] for a in json.load(sys.stdin)['archs'] if 0.78 <= a['fraction'] <= 0.8))") \
	    || exit 1; \
	  echo; echo "== archopt prune --model ptb-llama-8l --arch $$best --out demo/pruned-80 (the best measured at 80%;"; \
	  echo "   no network and no --data-dir: the importance computed while verifying is in the cache)"; \
	  $(ARCHOPT) prune --model ptb-llama-8l --arch $$best --out demo/pruned-80 --weights $(MODEL) || exit 1; \
	else \
	  echo; echo "($(MODEL) not found: the query without the real verification)"; \
	  echo "== archopt query --model ptb-llama-8l --params 80%"; \
	  $(ARCHOPT) query --model ptb-llama-8l --params 80% --objectives ppl_wikitext2,ppl_ptb --top 8; \
	fi

clean:
	rm -rf $(VENV) demo build *.egg-info
