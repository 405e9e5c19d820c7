# Two commands set everything up from nothing: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
HOST ?= 127.0.0.1

.PHONY: install test test-fast demo lab ui bench synth clean lint strip-notebooks postgres postgres-stop server serve

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# Reinstall only when the package metadata changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The full suite (CI runs it); test-fast is a developer's loop: unit tests on tiny shapes, no
# servers, Ray, torchrun, papermill or browser (markers e2e and slow, pyproject.toml).
# Both run on PYTEST_WORKERS processes (pytest-xdist; 0 = one process): most tests keep one
# core busy or wait on a child process, so two workers use a 2-core machine's second core.
# Tests of one xdist_group (the Ray ones) run on the same worker, one after the other.
PYTEST_WORKERS ?= 2
XDIST = -n $(PYTEST_WORKERS) --dist loadgroup
test: $(STAMP)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not e2e and not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check recontrast tests benchmarks notebooks

# The notebooks are the source: run this before committing one you executed in JupyterLab
# (or `pre-commit install` once: .pre-commit-config.yaml runs the same on every commit).
NBSTRIPOUT_ARGS := --keep-id --extra-keys "metadata.language_info.codemirror_mode metadata.language_info.file_extension metadata.language_info.mimetype metadata.language_info.nbconvert_exporter metadata.language_info.pygments_lexer metadata.language_info.version metadata.papermill cell.metadata.papermill"
strip-notebooks: $(STAMP)
	$(VENV)/bin/nbstripout $(NBSTRIPOUT_ARGS) notebooks/*.ipynb

demo: $(STAMP)
	$(VENV)/bin/recontrast demo

synth: $(STAMP)
	$(VENV)/bin/recontrast synth --out data/synthetic

bench: $(STAMP)
	$(PY) benchmarks/run.py

# JupyterLab on loopback with its token; --allow-root only when running as root.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ip $(HOST) --no-browser $(if $(filter 0,$(shell id -u)),--allow-root,)

# MLflow UI over the local store (sqlite + mlruns/artifacts) unless MLFLOW_TRACKING_URI is set.
# MLflow 3 opens in its GenAI view (traces); the runs, metrics and models are in the ML view.
ui: $(STAMP)
	@echo "MLflow UI, machine-learning view: http://$(HOST):5000/#/experiments?workflowType=machine_learning"
	@echo "  (\`recontrast batch\` prints the link to a study's runs)"
	$(VENV)/bin/mlflow ui --host $(HOST) --port 5000 \
	  --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlruns/mlflow.db} \
	  --default-artifact-root ./mlruns/artifacts

# A logged or registered model as a REST service (README "Serve a model"):
#   make serve MODEL=models:/weave/1   then POST images to http://$(HOST):$(SERVE_PORT)/invocations
# MLflow starts `uvicorn` by name, so the venv's scripts go on PATH.
MODEL ?=
SERVE_PORT ?= 5001
serve: $(STAMP)
	@test -n "$(MODEL)" || { echo "make serve MODEL=models:/<name>/<version> (recontrast register prints it)"; exit 2; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///mlruns/mlflow.db} \
	  $(VENV)/bin/mlflow models serve -m "$(MODEL)" --env-manager local --host $(HOST) --port $(SERVE_PORT)

# One tracking server for a team (docs/scaling.md): MLflow on PostgreSQL, artifacts proxied by
# the server into MLFLOW_ARTIFACTS. Clients: MLFLOW_TRACKING_URI=http://127.0.0.1:5000 recontrast ...
# `make postgres` starts a PostgreSQL for it on this machine (Debian's packages; .ci/postgres).
MLFLOW_PORT ?= 5000
MLFLOW_BACKEND ?= postgresql://mlflow:mlflow@127.0.0.1:5433/mlflow
MLFLOW_ARTIFACTS ?= $(CURDIR)/mlruns/server-artifacts
MLFLOW_WORKERS ?= 4

postgres:
	.ci/postgres start

postgres-stop:
	.ci/postgres stop

server: $(STAMP)
	$(VENV)/bin/mlflow server --host $(HOST) --port $(MLFLOW_PORT) --workers $(MLFLOW_WORKERS) \
	  --backend-store-uri $(MLFLOW_BACKEND) --serve-artifacts --artifacts-destination $(MLFLOW_ARTIFACTS)

clean:
	rm -rf $(VENV) .pytest_cache runs preds
