"""Tokenizers: sentencepiece training and round trips, Hugging Face tokenizer.json, the cached default, the CLI."""

import json
import pickle

import pytest

from qwen35_jax.data import tokenizer as tk
from qwen35_jax.errors import UserError

CODE = '''def f(x, y=3):
\t"""Add   things."""
    if x > 10:  # spaces   inside
        return x + y * 2024

class Point:
    def __init__(self, a, b):
        self.a, self.b = a, b
'''


def small_corpus():
    return [CODE.replace("f(", f"f{i}(").replace("2024", str(i * 37)) for i in range(40)]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return tk.train_sentencepiece(small_corpus(), tmp_path_factory.mktemp("sp") / "tiny", vocab_size=320)


def test_sentencepiece_round_trips_code_exactly(sp_model):
    tok = tk.load_tokenizer(sp_model)
    assert isinstance(tok, tk.Tokenizer) and (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (320, 1, 2, 3)
    for text in (CODE, "  leading spaces\n\n\ttabs\n", "naïve ünïcödé → 漢字 🙂", "x  =   1\n"):
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert tok.encode("") == []


def test_sentencepiece_training_is_deterministic_and_atomic(sp_model, tmp_path):
    again = tk.train_sentencepiece(small_corpus(), tmp_path / "again", vocab_size=320)
    pieces = [tk.load_tokenizer(m)._sp.id_to_piece(list(range(320))) for m in (sp_model, again)]
    assert pieces[0] == pieces[1]  # every host of a pod trains the same model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model", "again.vocab"]


def test_sentencepiece_tokenizer_pickles_without_its_file(sp_model, tmp_path):
    tok = tk.load_tokenizer(sp_model)
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(CODE) == tok.encode(CODE)


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(small_corpus(), trainer)
    hf.save(str(tmp_path / "tokenizer.json"))

    tok = tk.load_tokenizer(tmp_path)  # a folder holding tokenizer.json
    assert isinstance(tok, tk.HFTokenizer) and isinstance(tok, tk.Tokenizer)
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (0, 1, None)
    assert tok.decode(tok.encode(CODE)) == CODE
    assert pickle.loads(pickle.dumps(tok)).encode(CODE) == tok.encode(CODE)

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    assert tk.load_tokenizer(tmp_path / "tokenizer.json").eos_id == 1


def test_load_tokenizer_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        tk.load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UserError, match="junk.json"):
        tk.load_tokenizer(tmp_path / "junk.json")
    with pytest.raises(UserError, match="neither"):
        tk.load_tokenizer(tmp_path)


def test_default_tokenizer_trains_once_and_caches(tmp_path, monkeypatch):
    from qwen35_jax.data import corpus

    calls = []
    monkeypatch.setattr(corpus, "stdlib_documents", lambda split: calls.append(split) or iter(small_corpus()))
    first = tk.default_tokenizer(tmp_path, vocab_size=320)
    second = tk.default_tokenizer(tmp_path, vocab_size=320)
    assert calls == ["train"] and first.model_file == second.model_file
    assert first.model_file.startswith(str(tmp_path / "stdlib-v"))


def test_tokenizer_train_cli(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i, text in enumerate(small_corpus()[:10]):
        (data / f"{i}.txt").write_text(text)
    out = tmp_path / "out" / "tok"
    assert tk.tokenizer_main(["train", "--input", str(data), "--vocab-size", "400", "--out", str(out)]) == 0
    assert "400 pieces" in capsys.readouterr().out
    assert tk.load_tokenizer(f"{out}.model").decode(tk.load_tokenizer(f"{out}.model").encode(CODE)) == CODE
    with pytest.raises(UserError, match="too small"):
        tk.tokenizer_train_main(["--input", str(data), "--vocab-size", "100", "--out", str(out)])
