"""Tokenizers: a byte-level default that needs no files, any local HF ``tokenizer.json``,
and training a byte-level BPE with the ``tokenizers`` library.

Each tokenizer has an identity (name + content hash) and a vocab size that go into the
shard manifest; training checks that every domain was prepared with the same one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then ``<|endoftext|>`` (256) and ``<pad>`` (257)."""

    name = "byte-v1"
    identity = "byte-v1"
    vocab_size = 258
    eos_id = 256
    pad_id = 257
    path = None

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (nothing is fetched from a hub)."""

    def __init__(self, path: str, eos_token: str | None = None) -> None:
        from tokenizers import Tokenizer

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"--tokenizer: {path} does not exist (expected a tokenizer.json file)")
        try:
            self._tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise ValueError(f"--tokenizer: {path} is not a Hugging Face tokenizer.json: {e}") from e
        self.path = str(p.resolve())
        self.name = p.name
        self.identity = "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = (eos_token,) if eos_token else EOS_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"--tokenizer: {path} has none of the end-of-text tokens {list(candidates)}; "
                             f"name the one it uses with --eos-token")
        self.eos_id = found[0]
        pad = self._tok.token_to_id("<pad>")
        self.pad_id = pad if pad is not None else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in
                self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(path: str | None, eos_token: str | None = None) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if path is None else HFTokenizer(path, eos_token)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def train_bpe(files: Sequence[str], vocab_size: int, output: str, min_frequency: int = 2) -> str:
    """Train a byte-level BPE on text/JSONL/LaTeX ``files`` and save ``output`` (a tokenizer.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .text import iter_documents

    if vocab_size < 300:
        raise ValueError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 300 (256 bytes + merges)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((doc.text for doc in iter_documents(files)), trainer=trainer)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    tok.save(output)
    return output
