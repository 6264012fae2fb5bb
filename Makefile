# One virtual environment for everything; every target creates it when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MINUTES ?= 8.5
DEMO_OUT ?= runs/demo

.PHONY: install test test-slow test-all demo clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,deploy,labeling]'
	touch $(STAMP)

# Label Studio (the `label-studio` extra) in a virtual environment of its own: its pins would change .venv's
# numpy. tests/test_label_studio.py and tests/test_labeling.py run it as a subprocess.
LS_VENV := .venv-label-studio
LS_STAMP := $(LS_VENV)/.installed
$(LS_STAMP): pyproject.toml
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/pip install -q --upgrade pip
	$(LS_VENV)/bin/pip install -q $$($(PYTHON) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['label-studio']))")
	touch $(LS_STAMP)

install: $(STAMP) $(LS_STAMP)

# The browser test of `maskrcnn serve`'s page (tests/test_serve.py) needs a Chromium: a system one (Debian's
# `chromium`, which .ci/run installs as root) or this download. Skipped without one; a failure under CI=true.
.PHONY: browser
browser: $(STAMP)
	$(BIN)/python -m playwright install chromium

# The tests that load ONNX Runtime, OpenVINO and NNCF run in a pytest process of their own: in one process
# with the rest (forking DataLoader workers, torchrun, servers), the test process was killed by a SIGSEGV
# at a later, unrelated test (2026-12-03; root cause not found). Each group passes alone.
RUNTIME_TESTS = tests/test_export.py tests/test_quantize.py tests/test_quantize_checkpoint.py tests/test_benchmark_cli.py

test: $(STAMP) $(LS_STAMP)
	$(BIN)/python -m pytest -q $(addprefix --ignore=,$(RUNTIME_TESTS))
	$(BIN)/python -m pytest -q $(RUNTIME_TESTS)

# Tests marked `slow` (the rule: README, "Tests"): only them, or everything.
test-slow: $(STAMP) $(LS_STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP) $(LS_STAMP)
	$(BIN)/python -m pytest -q -m ''

demo: $(STAMP)
	$(BIN)/maskrcnn demo --out $(DEMO_OUT) --minutes $(DEMO_MINUTES)

clean:
	rm -rf $(VENV) $(LS_VENV) runs
