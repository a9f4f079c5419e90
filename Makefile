# Two entry points: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench results results-pinn install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, pinned, so pip takes the builds on this machine's disk.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	# the distribution was called "fuse" before it became fuse-optim: drop a stale editable install of it
	$(PY) -m pip uninstall -q -y fuse 2>/dev/null || true
	# the optimizer alone needs torch only; the tuning layer, the backends, dashboards and tests are extras
	$(PY) -m pip install -q -e ".[tuning,ray,dashboards,lightning,test]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default: an Optuna study of when FUSE-PV should switch, on digits,
# stored in ./fuse-studies.log and tracked in ./mlflow.db (re-running resumes; a finished study just reports).
demo: $(STAMP)
	$(VENV)/bin/fuse-tune run studies/quickstart.yaml
	$(VENV)/bin/fuse-tune report --experiment quickstart --out reports/quickstart
	@echo "report: $(CURDIR)/reports/quickstart/report.html"
	@echo "browse the runs: $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

test: $(STAMP)
	bash scripts/install-system-deps.sh
	$(VENV)/bin/ruff check fuse_optim fuse_tune dashboards tests benchmarks examples
	$(PY) -m pytest tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Every comparison behind RESULTS.md, then its plots (about 55 minutes on 2 cores; re-running resumes):
#   make results DATA=/folder/holding/USPS/and/MNIST/raw
COMPARISONS ?= digits_logreg digits_mlp digits_cnn mnist_logreg usps_cnn usps_cnn_paper mnist_logreg_paper
results: $(STAMP)
	DATA=$(DATA) COMPARISONS="$(COMPARISONS)" scripts/run-results.sh
	for name in $(COMPARISONS); do \
	  $(VENV)/bin/fuse-tune report --experiment compare_$$name --out results/$$name/report || exit 1; done

# The PINN comparisons behind RESULTS.md's PINN tables (issue 14; no data files: the points are generated), then
# their reports; --threads 1 per worker (two torch threads per trial on 2 loaded cores are 10-30x slower):
#   make results-pinn
PINN_COMPARISONS ?= pinn_reaction pinn_convection pinn_wave pinn_reaction_long
results-pinn: $(STAMP)
	for name in $(PINN_COMPARISONS); do start=$$(date +%s); \
	  $(VENV)/bin/fuse-tune compare studies/compare/$$name.yaml --n-jobs 2 --threads 1 --out results/$$name --quiet \
	    || exit 1; \
	  echo "== $$name: $$(( $$(date +%s) - start )) s wall (--n-jobs 2 --threads 1, $$(nproc) cores)" \
	    | tee -a results/timings.txt; \
	  $(VENV)/bin/fuse-tune report --experiment compare_$$name --out results/$$name/report || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
