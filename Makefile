# make test: set up .venv, lint, run the tests.   make demo: set up, run the demo.
# Each target installs what it needs; a second run reinstalls only when the dependency
# files (pyproject.toml, requirements.lock) changed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST_DIR := $(or $(FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)

.PHONY: setup dataset lint test demo lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	# imgaug 0.4.0 without its GUI opencv-python: its real dependencies (headless OpenCV
	# included) are listed in pyproject.toml.
	$(BIN)/python -m pip install -q --no-deps -c requirements.lock imgaug==0.4.0
	touch $@

dataset:
	@if [ -e "$(FMNIST_DIR)/t10k-images-idx3-ubyte.gz" ] || [ -e "$(FMNIST_DIR)/t10k-images-idx3-ubyte" ]; then \
	  true; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR); installing dataset-fashion-mnist"; \
	  apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; \
	else \
	  echo "Fashion-MNIST not found in $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist' or set FASHION_MNIST_DIR"; \
	  exit 1; \
	fi

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-logo

# Tests may run Ray without token authentication (one shared local cluster); deployments
# and `make demo` keep it on (deploy/, local/cli.py).
test: setup dataset lint
	RAY_AUTH_MODE=disabled $(BIN)/pytest

demo: setup dataset
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh $(DEMO_ARGS)

# Refresh requirements.lock from the current .venv after changing pyproject.toml.
lock: setup
	{ echo "# Exact versions for a reproducible install: the Makefile installs with '-c requirements.lock'."; \
	  echo "# Regenerate with 'make lock' after changing dependencies in pyproject.toml."; \
	  $(BIN)/python -m pip freeze --exclude-editable; } > requirements.lock

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
