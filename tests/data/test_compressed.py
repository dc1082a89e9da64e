"""Compressed inputs (gzip, bzip2, xz): a BEIR collection as the hub keeps it (``corpus.jsonl.gz``), a stage-0
corpus and a `make prepare` source read as their plain copies; a file cut short is one line naming it; a
compressed training file (read at byte offsets) is refused with what to do (tests/test_cli_errors.py)."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil

import pytest

from conftest import FIXTURES
from qwen3train.data.collections import load_collection
from qwen3train.data.records import DataError

DBPEDIA = FIXTURES / "dbpedia"


def test_a_beir_folder_of_compressed_files_loads_as_its_plain_copy(tmp_path):
    """Before, a folder with corpus.jsonl.gz was 'neither a BEIR folder nor a TREC folder'."""
    packed = tmp_path / "dbpedia"
    (packed / "qrels").mkdir(parents=True)
    (packed / "corpus.jsonl.gz").write_bytes(gzip.compress((DBPEDIA / "corpus.jsonl").read_bytes()))
    (packed / "queries.jsonl.bz2").write_bytes(bz2.compress((DBPEDIA / "queries.jsonl").read_bytes()))
    (packed / "qrels" / "test.tsv.xz").write_bytes(lzma.compress((DBPEDIA / "qrels" / "test.tsv").read_bytes()))
    plain, got = load_collection(DBPEDIA), load_collection(packed)
    assert len(plain.corpus) > 100 and len(plain.qrels) > 5
    assert (got.corpus, got.queries, got.qrels) == (plain.corpus, plain.queries, plain.qrels)


def test_a_compressed_stage0_corpus_and_prepare_source_read_as_their_plain_copies(tmp_path):
    """A corpus.jsonl.gz was read as plain text (its suffix is .gz): the first byte refused as UTF-8."""
    from qwen3train.data.prepare import import_jsonl
    from qwen3train.synth.corpus import read_documents

    src = DBPEDIA / "corpus.jsonl"
    gz = tmp_path / "corpus.jsonl.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    plain = list(read_documents([src], "English"))
    assert len(plain) > 100 and list(read_documents([gz], "English")) == plain
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q {i}", "pos": [f"p {i}"], "neg": [f"n {i}"]}) + "\n"
                             for i in range(20)) + "not json\n")
    xz = tmp_path / "pairs.jsonl.xz"
    xz.write_bytes(lzma.compress(pairs.read_bytes()))
    want, want_rej = import_jsonl(str(pairs), "retrieval", None, rejects=(r1 := []))
    got, got_rej = import_jsonl(str(xz), "retrieval", None, rejects=(r2 := []))
    assert got == want and len(want) == 20
    assert got_rej["rejected"] == want_rej["rejected"] == 1 and got_rej["source"].endswith(".xz")
    assert [r["where"].rsplit(":", 1)[1] for r in r2] == ["21"]  # the line, counted in the decompressed text
    from qwen3train.data.jsonl import read_jsonl  # evaluation pairs, the dev file

    heldout = tmp_path / "heldout.jsonl.bz2"
    heldout.write_bytes(bz2.compress("".join(pairs.read_text().splitlines(True)[:20]).encode()))
    assert read_jsonl(heldout) == [json.loads(x) for x in pairs.read_text().splitlines()[:20]]


@pytest.mark.parametrize("suffix, pack", [(".gz", gzip.compress), (".xz", lzma.compress), (".bz2", bz2.compress)])
def test_a_compressed_file_cut_short_is_one_line_naming_it(tmp_path, suffix, pack):
    from qwen3train.synth.corpus import read_documents

    data = pack((DBPEDIA / "corpus.jsonl").read_bytes())
    cut = tmp_path / f"corpus.jsonl{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"corpus\.jsonl\{suffix}: field '<file>': cannot be decompressed"):
        list(read_documents([cut], "English"))
    folder = tmp_path / "beir"
    shutil.copytree(DBPEDIA, folder)
    (folder / "corpus.jsonl").unlink()
    (folder / f"corpus.jsonl{suffix}").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cannot be decompressed"):
        load_collection(folder)
