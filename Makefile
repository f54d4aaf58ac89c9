# `make demo` and `make test` do all the set-up on a fresh machine, then run.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench docs install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: a CPU build of this release is available offline; an open range pulls a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/neuroar demo

# The report test opens the HTML in Debian's headless Chromium.
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium)

test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/ruff check src tests benchmarks
	# One test process per core, one test file each (its module fixtures train once); `pytest` alone runs serially.
	$(PY) -m pytest -n auto --dist loadfile

# Speed and memory, side by side; writes benchmarks/RESULTS.md and benchmarks/results/bench.json.
bench: $(STAMP)
	$(PY) benchmarks/bench.py

# The documentation (Sphinx, warnings as errors, as tests/test_docs.py builds it) -> build/docs/index.html.
docs: $(STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs build/docs

clean:
	rm -rf $(VENV) runs cache build
