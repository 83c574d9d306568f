# Two set-up commands: `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.pks4-installed

.PHONY: demo test bench clean browser

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned, so no dependency can pull a different (CUDA) build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pks4 demo --out runs/demo

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadfile

# Headless Chromium and its driver for the web page's browser test (tests/test_web.py), from Debian's packages
# when missing. Best effort: without root or a package index the test is skipped and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=120 \
	     --no-install-recommends chromium chromium-driver) >/dev/null 2>&1 || \
	  echo "make browser: could not install chromium and chromium-driver; the browser test will be skipped"

bench: $(STAMP)
	$(PY) benchmarks/scan.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
