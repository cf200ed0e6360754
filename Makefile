# Every target sets itself up on a fresh machine: system libraries, then .venv, then the package.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
DEMO_DIR ?= demo_out
export PYTHONHASHSEED := 0

.PHONY: setup system-deps browser-deps test test-fast test-browser demo bench clean cluster-up cluster-down

setup: $(STAMP)

# OpenCV (pulled in by mediapipe) links libGL and glib; slim images lack them.
system-deps:
	@if ! ldconfig -p | grep -q 'libGL.so.1' || ! ldconfig -p | grep -q 'libglib-2.0.so.0'; then \
		echo "installing libgl1 and libglib2.0-0"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libgl1 libglib2.0-0 >/dev/null; \
	fi

# Debian's Chromium for tests/test_report_browser.py, which drives it over a DevTools pipe (no
# chromedriver needed); about 2 minutes on a machine that lacks it, nothing on one that has it.
browser-deps:
	@if ! command -v chromium >/dev/null; then \
		echo "installing chromium"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	fi

$(STAMP): pyproject.toml | system-deps
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

test: $(STAMP) browser-deps
	$(PY) -m pytest -q -p no:cacheprovider

test-browser: $(STAMP) browser-deps
	$(PY) -m pytest -q -p no:cacheprovider tests/test_report_browser.py

test-fast: $(STAMP) browser-deps
	$(PY) -m pytest -q -m "not e2e"

demo: $(STAMP)
	$(VENV)/bin/flowood demo --workdir $(DEMO_DIR)

bench: $(STAMP)
	$(PY) bench/preprocess.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache

cluster-up: $(STAMP)
	$(VENV)/bin/flowood cluster up

cluster-down: $(STAMP)
	$(VENV)/bin/flowood cluster down
