"""Streaming merges of checkpoint folders: bit-identical to the in-memory reference, sharded,
prefix-tolerant, LoRA-aware, refusing mismatches by tensor name; merged exports load everywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from qwen3train.merge.apply import merge_folders, merge_state_dicts, select_checkpoints
from qwen3train.merge.io import FolderReader, MergeError


def fake_ckpt(path, seed, prefix="", dtype=torch.float32, extra=None, shard=False):
    g = torch.Generator().manual_seed(seed)
    sd = {f"{prefix}embed.weight": torch.randn(50, 8, generator=g).to(dtype),
          f"{prefix}layers.0.w": torch.randn(8, 8, generator=g).to(dtype),
          f"{prefix}norm.weight": torch.ones(8, dtype=dtype) + seed,
          f"{prefix}step": torch.tensor([seed], dtype=torch.int64)}
    sd.update(extra or {})
    path.mkdir(parents=True)
    if shard:
        keys = sorted(sd)
        parts = [keys[:2], keys[2:]]
        wm = {}
        for i, part in enumerate(parts):
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in part}, str(path / name))
            wm.update({k: name for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    else:
        save_file(sd, str(path / "model.safetensors"))
    (path / "config.json").write_text("{}")
    return {k.removeprefix(prefix): v for k, v in sd.items()}


@pytest.mark.parametrize("method", ["slerp", "running_slerp", "multislerp", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_equals_in_memory_reference_bit_for_bit(tmp_path, method, dtype):
    n = 2 if method == "slerp" else 3
    sds = [fake_ckpt(tmp_path / f"c{i}", i, dtype=dtype, shard=i == 1) for i in range(n)]
    out = merge_folders([tmp_path / f"c{i}" for i in range(n)], tmp_path / "out", method=method, t=0.3,
                        max_shard_size_mb=1)
    ref = merge_state_dicts(sds, method, t=0.3)
    got = load_file(out / "model.safetensors")
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    assert (out / "config.json").exists() and json.loads((out / "merge.json").read_text())["method"] == method


def test_sharded_output_and_prefixed_inputs(tmp_path):
    a = fake_ckpt(tmp_path / "a", 1, prefix="model.")
    b = fake_ckpt(tmp_path / "b", 2)
    big = 64 * 1024  # force several shards with a tiny size limit
    extra = {"big.weight": torch.randn(big // 4)}
    fake_ckpt(tmp_path / "c", 3, extra=extra)
    out = merge_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "out", method="slerp", t=0.5)
    got = load_file(out / "model.safetensors")
    assert "model.layers.0.w" in got  # output keeps the first input's naming
    ref = merge_state_dicts([a, b], "slerp", t=0.5)
    assert torch.equal(got["model.layers.0.w"], ref["layers.0.w"])
    reader = FolderReader(out)
    assert set(reader.keys()) == set(ref)


def test_multi_shard_output(tmp_path):
    for i in range(2):
        fake_ckpt(tmp_path / f"c{i}", i, extra={"big.weight": torch.full((300_000,), float(i + 1))})
    out = merge_folders([tmp_path / "c0", tmp_path / "c1"], tmp_path / "out", method="linear", max_shard_size_mb=1)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    merged = FolderReader(out)
    assert torch.allclose(merged.get("big.weight"), torch.full((300_000,), 1.5))


def test_mismatched_inputs_are_refused_naming_the_tensor(tmp_path):
    fake_ckpt(tmp_path / "a", 1)
    fake_ckpt(tmp_path / "b", 2, extra={"layers.0.w": torch.randn(8, 9)})
    with pytest.raises(MergeError, match=r"tensor 'layers.0.w'"):
        merge_folders([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    fake_ckpt(tmp_path / "c", 3, dtype=torch.bfloat16)
    with pytest.raises(MergeError, match=r"tensor '(embed.weight|layers.0.w|norm.weight)'.*bfloat16"):
        merge_folders([tmp_path / "a", tmp_path / "c"], tmp_path / "out")
    fake_ckpt(tmp_path / "d", 4, extra={"lm_head.weight": torch.randn(3)})
    with pytest.raises(MergeError, match="extra \\['lm_head.weight'\\]"):
        merge_folders([tmp_path / "a", tmp_path / "d"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_embedder_and_a_reranker_are_not_merged_into_one(tmp_path):
    """Their tensors can match (Qwen3-0.6B ties its LM head to the embeddings, so a reranker export holds what an
    embedder's holds): the merge ran and wrote the first input's kind, silently. Exports say their kind; a folder
    of another origin (a base LM: LM-Cocktail merges one in) says none and merges with either."""
    for name, seed, kind in (("emb", 1, "embedder"), ("emb2", 2, "embedder"), ("rr", 3, "reranker"), ("base", 4, None)):
        fake_ckpt(tmp_path / name, seed)
        if kind:
            (tmp_path / name / "qwen3train.json").write_text(json.dumps({"kind": kind}))
    with pytest.raises(MergeError, match=r"merge inputs of two kinds: .*emb is an embedder, .*rr a reranker"):
        merge_folders([tmp_path / "emb", tmp_path / "base", tmp_path / "rr"], tmp_path / "out")
    with pytest.raises(MergeError, match=r"two kinds: .*emb is an embedder, .*rr a reranker"):
        merge_folders([tmp_path / "emb", tmp_path / "emb2"], tmp_path / "out", base=tmp_path / "rr")
    assert not (tmp_path / "out").exists()
    merge_folders([tmp_path / "emb", tmp_path / "base", tmp_path / "emb2"], tmp_path / "out", method="multislerp")
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture(scope="module")
def stage2_run(tiny_model_dir, tmp_path_factory):
    """A real (tiny) training run with 3 saved checkpoints, plus a LoRA adapter of the base."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from helpers import make_pairs, train_cfg

    from qwen3train.train.loop import run

    tmp = tmp_path_factory.mktemp("s2")
    cfg = train_cfg(tiny_model_dir, make_pairs(tmp / "d.jsonl"), tmp / "run", max_steps=6, save_every=2,
                    keep_last=0, lr=3e-3)
    run(cfg)
    yield tmp / "run", tmp / "d.jsonl"
    shutil.rmtree(tmp, ignore_errors=True)  # ~0.5 GB of checkpoints


def test_merge_of_trained_checkpoints_loads_everywhere(stage2_run, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from qwen3train.models.build import ModelConfig, build_embedder

    run_dir, _ = stage2_run
    inputs = select_checkpoints(run_dir, last=3, every=1)
    assert [p.parent.name for p in inputs] == ["step_0000002", "step_0000004", "step_0000006"]
    out = merge_folders(inputs, tmp_path / "merged", method="multislerp")
    texts = ["what is gravity?", "a tensor is described here"]
    ours = build_embedder(ModelConfig(name_or_path=str(out))).encode(texts)
    st = torch.as_tensor(SentenceTransformer(str(out), device="cpu").encode(texts))
    assert (ours - st).abs().max() <= 1e-5 and torch.isfinite(ours).all()
    AutoModel.from_pretrained(out)  # plain transformers
    ends = [build_embedder(ModelConfig(name_or_path=str(p))).encode(texts) for p in (inputs[0], inputs[-1])]
    assert (ours - ends[0]).abs().max() > 1e-6 and (ours - ends[1]).abs().max() > 1e-6


def test_lora_adapter_input_is_folded_into_its_base(tiny_model_dir, tmp_path):
    import peft
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_model_dir)
    lm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False))
    lm.save_pretrained(tmp_path / "adapter")
    merged = lm.merge_and_unload()
    merged.save_pretrained(tmp_path / "folded")
    out = merge_folders([tmp_path / "adapter", tmp_path / "folded"], tmp_path / "out", method="linear",
                        lora_base=tiny_model_dir)
    want, got = FolderReader(tmp_path / "folded"), FolderReader(out)  # canonical names
    assert set(got.keys()) >= set(want.keys())
    for k in want.keys():
        assert torch.allclose(got.get(k), want.get(k), atol=1e-6), k


@pytest.mark.slow
def test_merge_cli_with_selection_by_evaluation(stage2_run, tmp_path):
    run_dir, data = stage2_run
    out = tmp_path / "merged"
    cmd = [sys.executable, "-m", "qwen3train.cli.main", "--config-name=merge", f"run_dir={run_dir}", "select.last=2", "method=slerp",
           f"output_dir={out}", f"dev_file={data}", "candidates_t=[0.3,0.7]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sel = json.loads((out / "merge_selection.json").read_text())
    table = sel["candidates"]
    assert len(table) == 4 and all("ndcg@10" in r for r in table)  # 2 merges + 2 inputs
    top = max(table, key=lambda r: (r["ndcg@10"], r["kind"] == "merge"))
    assert sel["chosen"] == top["candidate"] and sel["fallback"] == (top["kind"] == "input")
    if not sel["fallback"]:
        assert json.loads((out / "merge.json").read_text())["t"] in (0.3, 0.7)


@pytest.mark.slow
def test_merge_falls_back_to_the_best_checkpoint_when_merging_hurts(stage2_run, tmp_path):
    """Merging the last checkpoint with a wrecked copy of itself (weights replaced by noise) scores below
    that checkpoint on dev, so the output must be the checkpoint itself, bit for bit, and the selection
    must say fallback. Without the fallback the output would be the damaged merge."""
    from qwen3train.merge.apply import MergeConfig
    from qwen3train.merge.run import run as merge_run

    run_dir, data = stage2_run
    good = select_checkpoints(run_dir, last=1, every=1)[0]
    bad = tmp_path / "wrecked"
    shutil.copytree(good, bad)
    for f in bad.glob("*.safetensors"):
        g = torch.Generator().manual_seed(0)
        save_file({k: torch.randn(v.shape, generator=g).to(v.dtype) * v.float().std().to(v.dtype)
                   for k, v in load_file(f).items()}, f)
    from qwen3train.integrity import write_manifest

    write_manifest(bad)  # a different model on purpose, not a damaged copy: its own checksums
    out = merge_run(MergeConfig(inputs=[str(good), str(bad)], method="slerp", t=0.5, run_dir=None,
                                output_dir=str(tmp_path / "merged"), dev_file=str(data)))
    sel = json.loads((out / "merge_selection.json").read_text())
    assert sel["fallback"] is True and sel["chosen"] == f"input {good}", sel
    assert sel["score"] > sel["best_merge_score"]
    want = {k: v for f in good.glob("*.safetensors") for k, v in load_file(f).items()}
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
