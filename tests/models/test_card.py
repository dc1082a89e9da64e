"""Model cards: every export carries a README.md with its base model, each stage that made it (steps,
batch, lr, loss settings, data with counts), its evaluation and usage; stages and merges extend the
lineage of the export they start from; export.push_to_hub uploads the folder with its card."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from helpers import make_pairs, train_cfg  # noqa: E402

from qwen3train.models.card import push_to_hub, read_meta  # noqa: E402
from qwen3train.train.loop import run  # noqa: E402


def test_cards_follow_the_lineage_through_stages_merge_and_eval(tiny_model_dir, tmp_path):
    data = make_pairs(tmp_path / "pairs.jsonl", n=40, k=1)
    s1 = train_cfg(tiny_model_dir, data, tmp_path / "s1", max_steps=3, temperature=0.07)
    s1.run.name = "stage1"
    final1 = run(s1)
    card = (final1 / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n")
    assert f"Base model: `{tiny_model_dir}`" in card
    assert "**stage1**: 3 steps at global batch 8, lr 0.001" in card and "temperature=0.07" in card
    assert "pairs.jsonl: 40 records" in card and "Not evaluated yet" in card
    assert 'prompt_name="query"' in card and "LLM(model=" in card  # usage: sentence-transformers, vLLM

    s2 = train_cfg(tiny_model_dir, data, tmp_path / "s2", max_steps=4, save_every=2, keep_last=0)
    s2.run.name, s2.model.init_from = "stage2", str(final1)
    final2 = run(s2)
    lineage = read_meta(final2)["card"]["lineage"]
    assert [x["stage"] for x in lineage] == ["stage1", "stage2"] and [x["steps"] for x in lineage] == [3, 4]
    assert read_meta(final2)["card"]["base_model"] == str(tiny_model_dir)  # not stage 1's folder
    ckpt = tmp_path / "s2" / "checkpoints" / "step_0000002" / "model"
    assert read_meta(ckpt)["card"]["lineage"][-1]["steps"] == 2  # a checkpoint's card says where it stopped

    from qwen3train.merge.apply import MergeConfig
    from qwen3train.merge.run import run as merge

    merged = merge(MergeConfig(inputs=[str(ckpt), str(tmp_path / "s2" / "checkpoints" / "step_0000004" / "model")],
                               method="slerp", t=0.5, output_dir=str(tmp_path / "merged")))
    lineage = read_meta(merged)["card"]["lineage"]
    assert [x["stage"] for x in lineage] == ["stage1", "stage2", "merge"] and lineage[1]["steps"] == 4  # the last input's
    assert lineage[-1]["sources"] == ["s2/step_0000002", "s2/step_0000004"]
    assert "**merge** (slerp t=0.5)" in (merged / "README.md").read_text()

    from qwen3train.eval.run import EvalConfig, run as evaluate

    held = make_pairs(tmp_path / "held.jsonl", n=12, k=0)
    evaluate(EvalConfig(models={"merged": str(merged)}, pairs=[str(held)], output_dir=str(tmp_path / "eval"),
                        cache_dir=None, max_length=64))
    text = (merged / "README.md").read_text()
    row = json.loads((tmp_path / "eval" / "results.jsonl").read_text().splitlines()[0])
    assert f"| {row['dataset']} | full | {row['ndcg@10']:.4f} |" in text and "Not evaluated yet" not in text

    from sentence_transformers import SentenceTransformer

    SentenceTransformer(str(merged), device="cpu")  # a folder with a card still loads


class FakeHub:
    """Records the calls of huggingface_hub.HfApi that push_to_hub makes (no network in tests)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, folder_path, repo_id, **kw):
        self.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()


def test_push_to_hub_uploads_the_export_with_its_card(tiny_model_dir, tmp_path, monkeypatch):
    data = make_pairs(tmp_path / "pairs.jsonl", n=16, k=1)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "run", max_steps=2)
    cfg.export.push_to_hub = "me/tiny-embedder"
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # checked (offline) before training; FakeHub never sends it
    hub = FakeHub()
    import qwen3train.models.card as card

    monkeypatch.setattr(card, "push_to_hub", lambda folder, repo, private: push_to_hub(folder, repo, private=private, api=hub))
    run(cfg)
    assert hub.calls[0] == ("create_repo", "me/tiny-embedder", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert hub.calls[1][0] == "upload_folder" and "README.md" in hub.calls[1][2] and "model.safetensors" in hub.calls[1][2]


def test_an_upload_without_a_token_stops_before_training(tiny_model_dir, tmp_path, monkeypatch):
    """export.push_to_hub with no token anywhere (HF_TOKEN, the login file): one line before the model is
    trained, not a hub error after the last step. Catches a check left to the upload at the end."""
    from qwen3train.errors import ConfigError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no login file
    data = make_pairs(tmp_path / "pairs.jsonl", n=16, k=1)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "run", max_steps=2)
    cfg.export.push_to_hub = "me/tiny-embedder"
    with pytest.raises(ConfigError, match=r"export.push_to_hub=me/tiny-embedder needs a Hugging Face token"):
        run(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_failed_upload_keeps_the_model_and_a_rerun_uploads_it(tiny_model_dir, tmp_path, monkeypatch):
    """The hub refuses the upload at the end of a run (network, permissions): one line naming the trained model and
    how to retry; rerunning the same command uploads it without training a step."""
    from qwen3train.errors import ConfigError
    import qwen3train.models.card as card

    class DownHub(FakeHub):
        def upload_folder(self, folder_path, repo_id, **kw):
            raise ConnectionError("Max retries exceeded with url: /api/repos/create\n(more lines)")

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    data = make_pairs(tmp_path / "pairs.jsonl", n=16, k=1)
    cfg = train_cfg(tiny_model_dir, data, tmp_path / "run", max_steps=2, save_every=1)
    cfg.export.push_to_hub = "me/tiny-embedder"
    hub = DownHub()
    monkeypatch.setattr(card, "push_to_hub", lambda folder, repo, private: push_to_hub(folder, repo, private=private, api=hub))
    with pytest.raises(ConfigError, match=r"the final model is at .*final, but uploading it to me/tiny-embedder failed "
                                          r"\(ConnectionError: Max retries exceeded with url: /api/repos/create\); "
                                          r"rerun the same command to upload it"):
        run(cfg)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
    hub = FakeHub()
    run(cfg)
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2  # no step trained again
