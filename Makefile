# Every target creates and fills .venv from pyproject.toml, at the versions in constraints.txt,
# when it is missing or stale.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast test-learning lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@# The venv takes about 6 GB (torch's CUDA build): say so before pip fails half-way on a full disk.
	@$(PYTHON) -c "import shutil; f = shutil.disk_usage('.').free / 2**30; f < 7 and print(f'warning: {f:.1f} GB free here; installing .venv takes about 6 GB')"
	@# transformers 5.24 needs Python 3.11 (Ubuntu 22.04's python3 is 3.10): refuse before making a venv of it.
	@py=$(PY); test -x $$py || py=$(PYTHON); $$py -c "import sys; sys.version_info >= (3, 11) or sys.exit('$$py is Python ' + sys.version.split()[0] + ': sam4mllm needs 3.11 or newer; run make with PYTHON=python3.11 (or newer)' + (', after rm -rf $(VENV)' if '$$py' == '$(PY)' else ''))"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The main job on the embedded synthetic default.
demo: $(STAMP)
	$(PY) scripts/demo.py

lint: $(STAMP)
	$(PY) -m ruff check sam4mllm scripts tests bench

# Two workers, one test file each at a time (files share session fixtures), one OpenMP thread each
# (tests/conftest.py): 8-12 min on this 2-core machine (2026-12-07, busy or not; 10-14 min with installing, in a fresh clone).
test: $(STAMP) lint
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

# Trains a tiny PQPP model until it beats the trivial baselines (4-11 min; not in CI).
test-learning: $(STAMP)
	$(PY) -m pytest -q -m learning -s

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
