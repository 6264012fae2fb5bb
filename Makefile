# One virtual environment for everything; every target creates it when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MINUTES ?= 8.5
DEMO_OUT ?= runs/demo

.PHONY: install test test-slow test-all test-label-studio demo docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,deploy,labeling,docs]'
	touch $(STAMP)

install: $(STAMP)

# Label Studio in a virtual environment of its own (its pins, numpy < 2.3 among them, clash with .venv's), at the
# versions of deploy/label-studio/constraints.txt (a pip freeze of the environment the tests passed in). Only the
# slow tests (tests/test_label_studio.py) and docs/images/label_studio_preannotation.py use it, as a subprocess;
# make test does not need it. make label-studio makes it alone; make test-slow and make test-all make it too.
LS_VENV := .venv-label-studio
LS_STAMP := $(LS_VENV)/.installed
LS_REQUIREMENTS := deploy/label-studio/requirements.txt deploy/label-studio/constraints.txt
.PHONY: label-studio
label-studio: $(LS_STAMP)
$(LS_STAMP): $(LS_REQUIREMENTS)
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q -r deploy/label-studio/requirements.txt -c deploy/label-studio/constraints.txt
	touch $(LS_STAMP)

# The browser test of `maskrcnn serve`'s page (tests/test_serve.py) needs a Chromium: a system one (Debian's
# `chromium`, which .ci/run installs as root) or this download. Skipped without one; a failure under CI=true.
.PHONY: browser
browser: $(STAMP)
	$(BIN)/python -m playwright install chromium

# One pytest process. Until 2026-12 the tests that load OpenVINO ran in a second one: in one process with the
# rest, a later unrelated test was killed by SIGSEGV (si_code SI_KERNEL). The cause: every openvino.Core gave
# the main thread a new alternate signal stack and, destroyed first-in first-out, left it pointing at unmapped
# memory, where the kernel then failed to deliver the next signal a Python handler catches (SIGCHLD after
# DataLoader workers). Fixed by one process-wide Core (maskrcnn/onnx_backends.py, openvino_core);
# tests/test_signal_stack.py is the regression test and tests/conftest.py stops the run at any test that
# leaves that stack unmapped. -rs lists each skip and its reason; under CI=true (.ci/run) a skip is a
# failure unless tests/conftest.py's SKIPS_ALLOWED_IN_CI names it.
test: $(STAMP)
	$(BIN)/python -m pytest -q -rs

# Tests marked `slow` (the rule and the list: docs/tests.md): only them, or everything.
test-slow: $(STAMP) $(LS_STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP) $(LS_STAMP)
	$(BIN)/python -m pytest -q -m ''

# Only the Label Studio tests (slow: Label Studio's first start migrates a new database; 1.5-8 minutes on 2 cores).
test-label-studio: $(STAMP) $(LS_STAMP)
	$(BIN)/python -m pytest -q -m slow tests/test_label_studio.py

# The documentation site: docs/ (and the API pages from docstrings, mkdocstrings) into site/, failing on any
# warning (a broken link or anchor, a missing page or Python name). Preview: .venv/bin/mkdocs serve.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

demo: $(STAMP)
	$(BIN)/maskrcnn demo --out $(DEMO_OUT) --minutes $(DEMO_MINUTES)

clean:
	rm -rf $(VENV) $(LS_VENV) runs site
