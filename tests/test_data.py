"""`dsv2 data prepare` and the loaders: stable split, streaming shards, batches as a pure function of the index."""
import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest

from conftest import stdlib_text
from dsv2.tokenizer import Tokenizer
from dsv2.train.bpe import train_tokenizer
from dsv2.train.data import TokenShards, TrainBatches, eval_windows, prepare, read_manifest
from dsv2.train.documents import is_validation, iter_documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src = root / "corpus"
    for i, text in enumerate(stdlib_text(n_files=40, chars=3000)):
        d = src / ("pkg" if i % 3 else "")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"mod{i:02d}.py").write_text(text)
    (src / "notes.txt").write_text("not python")
    (src / "blob.py").write_bytes(b"\xff\xfe\x00binary")
    tok = train_tokenizer(stdlib_text(n_files=20, chars=3000), str(root / "tok"), vocab_size=400)
    return str(src), str(root / "tok"), tok


def _tokens(data_dir, split):
    return np.concatenate([np.asarray(s) for s in TokenShards(data_dir, split).shards])


def test_prepare_writes_documents_with_separators_and_a_manifest(corpus, tmp_path):
    src, tok_dir, tok = corpus
    m = prepare([src], tok_dir, str(tmp_path / "d"), val_fraction=0.25, include=["*.py"], progress=False)
    assert m["dtype"] == "uint16" and m["tokenizer"]["vocab_size"] == tok.vocab_size
    assert m["skipped"] == {"not UTF-8": 1} and m["files_read"] == 41  # notes.txt excluded by --include
    tr, va = m["splits"]["train"], m["splits"]["validation"]
    assert tr["documents"] + va["documents"] == 40 and 3 <= va["documents"] <= 18
    for split in ("train", "validation"):
        ids = _tokens(str(tmp_path / "d"), split)
        assert len(ids) == m["splits"][split]["tokens"]
        assert (ids == tok.eos_token_id).sum() == (ids == tok.bos_token_id).sum() == m["splits"][split]["documents"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # the documents, in walk order, are exactly [bos] encode(text) [eos]
    docs = [(k, t) for k, t in iter_documents([src], include=["*.py"]) if not is_validation(k, 0.25)]
    want = np.concatenate([[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) + [tok.eos_token_id]
                           for _, t in docs])
    assert np.array_equal(_tokens(str(tmp_path / "d"), "train"), want)
    assert tr["bytes"] == sum(len(t.encode()) for _, t in docs)


def test_split_is_stable_across_runs_and_locations(corpus, tmp_path):
    src, tok_dir, _ = corpus
    moved = str(tmp_path / "elsewhere")
    shutil.copytree(src, moved)
    a = prepare([src], tok_dir, str(tmp_path / "a"), val_fraction=0.2, progress=False)
    b = prepare([moved], tok_dir, str(tmp_path / "b"), val_fraction=0.2, progress=False)
    assert a["splits"] == b["splits"]
    for split in ("train", "validation"):
        assert np.array_equal(_tokens(str(tmp_path / "a"), split), _tokens(str(tmp_path / "b"), split))
    # the rule itself: a hash of the document key, nothing else
    assert is_validation("pkg/mod01.py", 0.2) == is_validation("pkg/mod01.py", 0.2)
    frac = np.mean([is_validation(f"doc{i}", 0.1) for i in range(20000)])
    assert 0.09 < frac < 0.11
    with pytest.raises(ValueError, match="--overwrite"):
        prepare([src], tok_dir, str(tmp_path / "a"), progress=False)


def test_prepare_streams_into_shards(corpus, tmp_path):
    """Shards roll over at document boundaries, and peak memory does not grow with the corpus."""
    src, tok_dir, _ = corpus
    text = "".join(stdlib_text(n_files=40, chars=3000))

    def run(n_docs: int, name: str):
        jsonl = tmp_path / f"{name}.jsonl"
        with open(jsonl, "w") as f:
            for i in range(n_docs):  # 8 KB each
                f.write(json.dumps({"id": i, "content": text[i * 50 % 10000:][:8000]}) + "\n")
        tracemalloc.start()
        m = prepare([str(jsonl)], tok_dir, str(tmp_path / name), text_field="content", val_fraction=0.1,
                    shard_tokens=50_000, batch_documents=16, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return m, peak, os.path.getsize(jsonl)

    _, small_peak, _ = run(150, "small")
    m, peak, size = run(600, "big")
    assert peak < small_peak * 1.5 and peak < size / 4, f"peak {peak} B (vs {small_peak} B for a quarter of the data)"
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 10 and all(s["tokens"] <= 50_000 for s in shards[:-1])
    assert sum(s["documents"] for s in shards) == m["splits"]["train"]["documents"]
    for s in shards:  # every shard holds whole documents
        ids = np.fromfile(tmp_path / "big" / s["file"], dtype=np.uint16)
        assert ids[0] == 0 and ids[-1] == 1
    with pytest.raises(ValueError, match="--text-field"):
        prepare([str(tmp_path / "big.jsonl")], tok_dir, str(tmp_path / "x"), progress=False)


def test_train_batches_are_a_pure_function_of_seed_and_index(corpus, tmp_path):
    src, tok_dir, _ = corpus
    prepare([src], tok_dir, str(tmp_path / "d"), val_fraction=0.1, shard_tokens=3000, progress=False)
    shards = TokenShards(str(tmp_path / "d"))
    a, b = TrainBatches(shards, 32, seed=3), TrainBatches(shards, 32, seed=3)
    x1, y1 = a.get(40, 8)
    a.get(a.windows * 2 + 5, 4)  # wander into another epoch first
    assert np.array_equal(b.get(40, 8)[0], x1) and np.array_equal(a.get(40, 8)[1], y1)
    assert np.array_equal(x1[:, 1:], y1[:, :-1]) and x1.shape == (8, 32) and x1.dtype == np.int64
    assert not np.array_equal(TrainBatches(shards, 32, seed=4).get(40, 8)[0], x1)
    # one epoch visits every window once, all on the epoch's shift; the next epoch moves the boundaries
    for epoch in (0, 1, 2):
        where = [a.locate(k) for k in range(epoch * a.windows, (epoch + 1) * a.windows)]
        assert len(set(where)) == a.windows
        assert len({begin % 32 for _, begin in where}) == 1
        assert all(begin + 33 <= len(shards.shards[s]) for s, begin in where)
    assert len({a.locate(k * a.windows)[1] % 32 for k in range(6)}) > 1


def test_eval_windows_cover_every_token_once(corpus, tmp_path):
    src, tok_dir, _ = corpus
    prepare([src], tok_dir, str(tmp_path / "d"), val_fraction=0.3, shard_tokens=2000, progress=False)
    shards = TokenShards(str(tmp_path / "d"), "validation")
    targets = [y for _, y in eval_windows(shards, 64)]
    want = np.concatenate([np.asarray(s[1:]) for s in shards.shards])
    assert np.array_equal(np.concatenate(targets), want)
    sample = list(eval_windows(shards, 64, limit=5))
    assert len(sample) == 5 and all(len(x) == 64 for x, _ in sample)
    assert read_manifest(str(tmp_path / "d"))["splits"]["validation"]["tokens"] == shards.tokens
