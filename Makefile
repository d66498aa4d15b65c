# `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST_DEVICES ?= 8
RUN    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
export XLA_FLAGS := --xla_force_host_platform_device_count=$(HOST_DEVICES) $(XLA_FLAGS)

.PHONY: demo test install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

# Train the demo model on the embedded corpus over 8 simulated CPU devices, checkpoint it into a
# fresh run directory, then generate from the last checkpoint through the KV cache.
demo: $(STAMP)
	$(BIN)/jaxlm train configs/demo.yaml checkpoint.dir=$(RUN)
	$(BIN)/jaxlm generate --checkpoint $(RUN) --prompt "ROMEO:" --prompt "To be, or not to be" --max-new-tokens 120

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/kernels.py

clean:
	rm -rf $(VENV) runs .pytest_cache
