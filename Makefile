# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use. torch is pinned to 2.13.0 first so that the reference extras do not
# pull a CUDA build of torch (on this kind of machine 2.13.0 is a local CPU wheel).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[ref,train,test,data,report]"
	touch $(STAMP)

.PHONY: install test demo bench
install: $(STAMP)

# Two worker processes, whole files each (module fixtures are built once), in collection order (conftest.py
# puts the longest files first; xdist would reorder by test count).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

demo: $(STAMP)
	$(PY) -m examples.demo $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.run $(ARGS)
