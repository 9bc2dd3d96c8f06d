"""Tokenizers: a small protocol with sentencepiece and Hugging Face `tokenizer.json` implementations, sentencepiece
training tuned for source code, the cached default tokenizer of the embedded stdlib corpus, and
`qwen35 tokenizer train`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm

from qwen35_jax import paths
from qwen35_jax.errors import UserError

# Bump when the training recipe changes so that stale cached default tokenizers are not reused.
RECIPE_VERSION = 1


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceTokenizer:
    """A sentencepiece `.model`; unk=0, bos=1, eos=2, pad=3 for models trained by `train_sentencepiece`."""

    def __init__(self, model_file: str | os.PathLike | None = None, *, model_proto: bytes | None = None):
        if model_proto is None:
            model_proto = _read_bytes(model_file)
        self.model_file = None if model_file is None else str(model_file)
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        if self._sp.eos_id() < 0:
            raise UserError(f"sentencepiece model {model_file}: has no eos piece, which packing needs")
        self.eos_id = self._sp.eos_id()
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def __reduce__(self):  # worker processes rebuild from the model bytes, not a path they may not see
        return _sentencepiece_from_proto, (self.model_file, self._proto)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"


def _sentencepiece_from_proto(model_file, proto):
    return SentencePieceTokenizer(model_file, model_proto=proto)


# Names tried, in order, when tokenizer_config.json does not say which token is which.
_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
_BOS_NAMES = ("<s>", "<bos>", "<|begin_of_text|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "<|endoftext|>")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` package). Special tokens come from a
    `tokenizer_config.json` beside it when present, else from common names; `eos`/`bos`/`pad` override both."""

    def __init__(self, path: str | os.PathLike, *, eos: str | None = None, bos: str | None = None,
                 pad: str | None = None):
        from tokenizers import Tokenizer as _HFTok  # lazy: only needed for this kind

        path = paths.path(path)
        self.path = str(path)
        text = _read_bytes(path).decode("utf-8", errors="replace")
        try:
            self._tok = _HFTok.from_str(text)
        except Exception as e:  # the Rust error text names what is wrong in the file
            raise UserError(f"{path}: not a valid tokenizer.json: {e}") from None
        self._names = (eos, bos, pad)
        config = _read_tokenizer_config(path.parent / "tokenizer_config.json")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos_id = self._special(eos or config.get("eos_token"), _EOS_NAMES)
        if eos_id is None:
            raise UserError(f"{path}: cannot tell which token ends a document; pass eos=<token> "
                            f"(tried {', '.join(_EOS_NAMES)})")
        self.eos_id = eos_id
        self.bos_id = self._special(bos or config.get("bos_token"), _BOS_NAMES)
        pad_id = self._special(pad or config.get("pad_token"), _PAD_NAMES)
        self.pad_id = self.eos_id if pad_id is None else pad_id

    def _special(self, name, fallbacks) -> int | None:
        if isinstance(name, dict):
            name = name.get("content")
        for candidate in ([name] if name else []) + list(fallbacks):
            i = self._tok.token_to_id(candidate)
            if i is not None:
                return i
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __reduce__(self):
        eos, bos, pad = self._names
        return _hf_from_path, (self.path, eos, bos, pad)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _hf_from_path(path, eos, bos, pad):
    return HFTokenizer(path, eos=eos, bos=bos, pad=pad)


def _read_bytes(path) -> bytes:
    """A tokenizer file's bytes (local or gs://); a missing or unreadable file is a one-line UserError."""
    try:
        return paths.path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"tokenizer {path}: no such file") from None
    except OSError as e:
        raise UserError(f"tokenizer {path}: cannot be read ({e.strerror or type(e).__name__})") from None


def _read_tokenizer_config(path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(_read_bytes(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None


def load_tokenizer(path: str | os.PathLike, **special) -> SentencePieceTokenizer | HFTokenizer:
    """A sentencepiece `.model`, a `tokenizer.json`, or a folder holding one of them."""
    path = paths.path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).exists():
                return load_tokenizer(path / name, **special)
        raise UserError(f"{path}: folder has neither tokenizer.json nor tokenizer.model")
    if not path.exists():
        raise UserError(f"tokenizer {path}: no such file")
    if path.suffix == ".json":
        return HFTokenizer(path, **special)
    proto = _read_bytes(path)
    try:
        return SentencePieceTokenizer(path, model_proto=proto)
    except RuntimeError as e:
        raise UserError(f"{path}: not a sentencepiece model ({e})") from None


# ---------------------------------------------------------------------------------------------------- training


def training_sentences(texts: Iterable[str], *, max_sentence_chars: int = 2000,
                       max_total_chars: int = 64_000_000) -> Iterator[str]:
    """Cuts documents into runs of whole lines of about `max_sentence_chars` (newlines kept, since they are tokens
    for code); stops after `max_total_chars`, which bounds training time on large inputs."""
    total = 0
    for text in texts:
        buf, n = [], 0
        for line in text.splitlines(keepends=True):
            while len(line) > max_sentence_chars:  # a very long line would be dropped whole by the trainer
                yield line[:max_sentence_chars]
                total, line = total + max_sentence_chars, line[max_sentence_chars:]
            buf.append(line)
            n += len(line)
            if n >= max_sentence_chars:
                yield "".join(buf)
                total, buf, n = total + n, [], 0
        if buf:
            yield "".join(buf)
            total += n
        if total >= max_total_chars:
            return


def train_sentencepiece(texts: Iterable[str], out_prefix: str | os.PathLike, vocab_size: int, *,
                        model_type: str = "bpe", max_total_chars: int = 64_000_000,
                        num_threads: int | None = None) -> Path:
    """Trains a sentencepiece model on `texts` and writes `<out_prefix>.model` and `.vocab` atomically.

    Code-friendly settings: identity normalisation, whitespace kept exactly (runs of spaces may form pieces,
    no dummy prefix, so decode(encode(s)) == s), newline and tab as pieces, digits split, byte fallback for any
    character outside the vocabulary. Ids: unk=0, bos=1, eos=2, pad=3. Input order is kept (no sampling inside
    sentencepiece), so the same texts give the same model on every host. Returns the `.model` path.
    """
    if model_type not in ("bpe", "unigram"):
        raise UserError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    if vocab_size < 300:
        raise UserError(f"vocab_size={vocab_size} is too small: 256 byte pieces, 6 special pieces and the "
                        f"input's characters need at least 300")
    out_prefix = paths.path(out_prefix)
    remote = paths.is_remote(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    sentences = training_sentences(texts, max_total_chars=max_total_chars)
    with tempfile.TemporaryDirectory(dir=None if remote else str(out_prefix.parent), prefix=".sp-train-") as tmp:
        tmp_prefix = Path(tmp) / "model"
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences, model_prefix=str(tmp_prefix), vocab_size=vocab_size,
                model_type=model_type, byte_fallback=True, split_digits=True, remove_extra_whitespaces=False,
                add_dummy_prefix=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
                split_by_whitespace=False, user_defined_symbols=["\n", "\t"], character_coverage=0.99995,
                input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=8192,
                hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
                num_threads=num_threads or os.cpu_count() or 1, minloglevel=2)
        except RuntimeError as e:
            raise UserError(f"sentencepiece training for {out_prefix} failed: {e}") from None
        for ext in (".vocab", ".model"):  # .model last: its presence means the pair is complete
            if remote:
                paths.path(f"{out_prefix}{ext}").write_bytes(Path(f"{tmp_prefix}{ext}").read_bytes())
            else:
                os.replace(f"{tmp_prefix}{ext}", f"{out_prefix}{ext}")
    return paths.path(f"{out_prefix}.model")


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "qwen35_jax" / "tokenizers"


def default_tokenizer(cache_dir: str | os.PathLike | None = None, *, vocab_size: int = 4096) -> SentencePieceTokenizer:
    """The tokenizer of the embedded default: BPE trained on the stdlib corpus's train split at first use and
    cached as `<cache_dir>/stdlib-v<recipe>-<vocab>-<python version>/tokenizer.model`. A file lock makes concurrent
    first uses on one machine train once; the atomic rename means a killed run never leaves a partial model."""
    from qwen35_jax.data import corpus

    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    folder = cache_dir / f"stdlib-v{RECIPE_VERSION}-{vocab_size}-{platform.python_version()}"
    model = folder / "tokenizer.model"
    if model.exists():
        return SentencePieceTokenizer(model)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not model.exists():  # another process may have trained it while we waited
            train_sentencepiece(corpus.stdlib_documents("train"), folder / "tokenizer", vocab_size)
    return SentencePieceTokenizer(model)


# ---------------------------------------------------------------------------------------------------- CLI


def tokenizer_train_main(argv) -> int:
    """`qwen35 tokenizer train --input PATH_OR_SPEC --vocab-size N --out PREFIX`."""
    from qwen35_jax.data.sources import document_source, parse_spec

    parser = argparse.ArgumentParser(prog="qwen35 tokenizer train",
                                     description="Train a sentencepiece tokenizer (writes PREFIX.model, PREFIX.vocab).")
    parser.add_argument("--input", required=True,
                        help="'stdlib', a text file or folder, a .jsonl file, or a data spec in YAML, "
                             "e.g. '{kind: jsonl, path: data/, field: text}'")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", required=True, help="output prefix")
    parser.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    parser.add_argument("--max-chars", type=int, default=64_000_000, help="stop reading input after this many")
    args = parser.parse_args(argv)
    source = document_source(parse_spec(args.input))
    if source.tokenized:
        raise UserError(f"{args.input}: holds token ids, not text; a tokenizer trains on text")
    start = time.perf_counter()
    path = train_sentencepiece((source[i] for i in range(len(source))), args.out, args.vocab_size,
                               model_type=args.model_type, max_total_chars=args.max_chars)
    tok = SentencePieceTokenizer(path)
    print(f"wrote {path} ({tok.vocab_size} pieces from {len(source)} documents in "
          f"{time.perf_counter() - start:.1f}s)")
    return 0


def tokenizer_main(argv) -> int:
    """`qwen35 tokenizer SUBCOMMAND ...`; the only subcommand is `train`."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qwen35 tokenizer train --input PATH_OR_SPEC --vocab-size N --out PREFIX")
        return 0 if argv else 2
    if argv[0] != "train":
        raise UserError(f"qwen35 tokenizer: unknown subcommand {argv[0]!r} (expected 'train')")
    return tokenizer_train_main(argv[1:])
