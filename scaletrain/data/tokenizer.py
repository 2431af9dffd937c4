"""Tokenizers: a byte-level default that needs no files, any local HF ``tokenizer.json``,
and training a byte-level BPE with the ``tokenizers`` library.

Each tokenizer has an identity (name + content hash), a vocab size and its special tokens (by
string and id) that go into the shard manifest (``TokenizerInfo``); training checks that every
domain was prepared with the same one, every checkpoint carries it, and ``export_hf_tokenizer``
turns it into Hugging Face tokenizer files whose ids equal the training ids.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from scaletrain.errors import ScaletrainError

from .manifest import TokenizerInfo

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
PROBE = "Check: 1 + 1 = 2."  # a text to see what a tokenizer's post-processor adds around one


class TokenizerError(ScaletrainError):
    """A tokenizer file or special token that cannot be used; the message names the flag and file."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then ``<|endoftext|>`` (256) and ``<pad>`` (257); no BOS."""

    kind = "byte"
    name = "byte-v1"
    identity = "byte-v1"
    vocab_size = 258
    eos_token, eos_id = "<|endoftext|>", 256
    pad_token, pad_id = "<pad>", 257
    bos_token, bos_id = None, None
    path = None

    def info(self, add_bos: bool = False) -> TokenizerInfo:
        if add_bos:
            raise TokenizerError("--add-bos: the byte-level tokenizer has no BOS token; prepare with a --tokenizer "
                                 "that has one (e.g. <s>)")
        return TokenizerInfo(self.kind, self.name, self.identity, self.vocab_size, self.eos_token, self.eos_id,
                             self.pad_token, self.pad_id)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    special_strings: tuple[str, ...] = ()
    adds_bos = False

    def special_in(self, text: str) -> int:
        return -1  # every text is its bytes

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face ``tokenizer.json`` (nothing is fetched from a hub)."""

    kind = "hf"

    def __init__(self, path: str, eos_token: str | None = None, bos_token: str | None = None,
                 parse_special: bool = False) -> None:
        from tokenizers import Tokenizer

        p = Path(path)
        folder_tokens: dict[str, str] = {}
        self.chat_template: str | list | None = None
        self._folder_add_bos = None
        if p.is_dir():  # a Hugging Face model folder: its tokenizer.json, its special tokens as defaults, its chat
            folder_tokens = folder_special_tokens(p)  # template for the export
            self.chat_template = folder_chat_template(p)
            # transformers rebuilds a Llama/Gemma tokenizer's post-processor from these flags when it loads one
            self._folder_add_bos = _folder_json(p, "tokenizer_config.json").get("add_bos_token")
            p = p / "tokenizer.json"
        if not p.is_file():
            spm = p.parent / "tokenizer.model"
            hint = (f"; {p.parent} has only SentencePiece's tokenizer.model (older Llama and Mistral folders): "
                    f"transformers writes the tokenizer.json (with the sentencepiece package installed): python -c "
                    f"\"from transformers import AutoTokenizer as T; T.from_pretrained('{p.parent}')"
                    f".save_pretrained('{p.parent}')\""
                    if spm.is_file() else "")
            from scaletrain.files import hub_hint

            hint = hint or hub_hint(str(path))
            raise TokenizerError(f"--tokenizer: {p} does not exist (expected a tokenizer.json file or a Hugging Face "
                                 f"model folder that has one){hint}")
        try:
            self._tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise TokenizerError(f"--tokenizer: {path} is not a Hugging Face tokenizer.json: {e}") from e
        # a special token's string inside a document is text unless asked otherwise: a web page quoting "</s>" or
        # "<|endoftext|>" would otherwise end its document there (and split it under --document-masking). Added
        # tokens that are not special (a vocabulary extension) still match. Llama 3's and torchtitan's tiktoken
        # encoders do the same (disallowed_special=()); Hugging Face's split_special_tokens is this switch
        self.parse_special = parse_special
        self._tok.encode_special_tokens = not parse_special
        self.special_strings = tuple(sorted(t.content for t in self._tok.get_added_tokens_decoder().values()
                                            if t.special))
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self.special_strings, key=len,
                                                                              reverse=True))) \
            if self.special_strings else None
        self.path = str(p.resolve())
        self.name = p.name
        self.identity = file_identity(p)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos_token = eos_token or self._in_vocab(folder_tokens.get("eos_token"))
        bos_default = self._in_vocab(folder_tokens.get("bos_token"))
        eos = self._find(eos_token, EOS_CANDIDATES, "--eos-token", "end-of-text")
        assert eos is not None
        self.eos_token, self.eos_id = eos
        self.pad_token, self.pad_id = self._find(None, ("<pad>",), "", "") or eos
        self.bos_token, self.bos_id = self._find(bos_token or bos_default, BOS_CANDIDATES, "--bos-token",
                                                 "begin-of-text", required=bos_token is not None) or (None, None)

    @property
    def adds_bos(self) -> bool:
        """Whether the tokenizer's own post-processor puts its BOS before a text (Llama's, Mistral's: what
        ``AutoTokenizer(text)`` gives, and what the model was trained on); prepare's ``--add-bos`` follows it
        unless told. A folder's ``tokenizer_config.json`` ``add_bos_token``, when set, decides, as it does for
        transformers."""
        if self.bos_id is None:
            return False
        if isinstance(self._folder_add_bos, bool):
            return self._folder_add_bos
        full, bare = self._tok.encode(PROBE).ids, self._tok.encode(PROBE, add_special_tokens=False).ids
        return full[:1] == [self.bos_id] and full[1:1 + len(bare)] == bare  # an EOS after it too: prepare adds one

    def _in_vocab(self, token: str | None) -> str | None:
        return token if token and self._tok.token_to_id(token) is not None else None

    def _find(self, given: str | None, candidates: Sequence[str], flag: str, what: str,
              required: bool = True) -> tuple[str, int] | None:
        for t in (given,) if given else candidates:
            i = self._tok.token_to_id(t)
            if i is not None:
                return t, i
        if required and flag:
            tried = list((given,) if given else candidates)
            raise TokenizerError(f"--tokenizer: {self.path} has none of the {what} tokens {tried}; "
                                 f"name the one it uses with {flag}")
        return None

    def info(self, add_bos: bool = False) -> TokenizerInfo:
        if add_bos and self.bos_id is None:
            raise TokenizerError(f"--add-bos: {self.path} has none of the begin-of-text tokens "
                                 f"{list(BOS_CANDIDATES)}; name the one it uses with --bos-token")
        return TokenizerInfo(self.kind, self.name, self.identity, self.vocab_size, self.eos_token, self.eos_id,
                             self.pad_token, self.pad_id, self.bos_token, self.bos_id, add_bos, self.parse_special,
                             self.chat_template)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.uint32) for e in
                self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def special_in(self, text: str) -> int:
        """The index in ``special_strings`` of the first special token's string ``text`` spells out, or -1: prepare
        counts such documents and says how it read them."""
        m = self._special_re.search(text) if self._special_re is not None else None
        return self.special_strings.index(m.group(0)) if m else -1

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def folder_special_tokens(folder: Path) -> dict[str, str]:
    """eos_token / bos_token of a Hugging Face folder (tokenizer_config.json, else special_tokens_map.json); each
    may be a string or a dict with its "content"."""
    out: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        data = _folder_json(folder, name)
        for key in ("eos_token", "bos_token"):
            v = data.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                out[key] = v
    return out


def _folder_json(folder: Path, name: str) -> dict:
    """A JSON object file of a Hugging Face folder ({} when absent or not an object)."""
    f = folder / name
    try:
        data = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    except ValueError as e:  # not JSON, or not UTF-8
        raise TokenizerError(f"--tokenizer: {f} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def folder_chat_template(folder: Path) -> str | list | None:
    """A Hugging Face folder's chat template: ``chat_template.jinja`` (what transformers 5 saves), else
    ``chat_template.json``, else the ``chat_template`` of ``tokenizer_config.json`` (what hub repositories such as
    Llama 3's and Qwen2.5's ship; a string, or a list of named templates)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = _folder_json(folder, name).get("chat_template")
        if isinstance(template, (str, list)) and template:
            return template
    return None


def load_tokenizer(path: str | None, eos_token: str | None = None, bos_token: str | None = None,
                   parse_special: bool = False) -> ByteTokenizer | HFTokenizer:
    """``parse_special``: a special token's string in a text becomes its id (Hugging Face's default) instead of
    being encoded as the characters it is."""
    if path is None:
        if parse_special:
            raise TokenizerError("--parse-special-tokens: the byte-level tokenizer encodes every text as its bytes; "
                                 "give a --tokenizer whose special tokens the texts spell out")
        return ByteTokenizer()
    return HFTokenizer(path, eos_token, bos_token, parse_special)


def file_identity(path: str | Path) -> str:
    """A tokenizer.json's identity, as manifests and checkpoints record it: its content hash."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def train_bpe(files: Sequence[str], vocab_size: int, output: str, min_frequency: int = 2,
              opts=None, overwrite: bool = False) -> tuple[str, int]:
    """Train a byte-level BPE on the documents of ``files`` (read as prepare reads them, with ``opts``: a
    ``ReadOptions``) and save ``output`` (a tokenizer.json);
    returns (path, the vocab size reached, which a small corpus keeps below ``vocab_size``). Its special tokens:
    ``<|endoftext|>`` (id 0, the EOS prepare joins documents with), ``<pad>`` (1) and ``<|begin_of_text|>`` (2,
    the BOS that ``prepare --add-bos`` puts before every document)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from .text import iter_documents

    if vocab_size < 300:
        raise TokenizerError(f"--vocab-size {vocab_size}: a byte-level BPE needs at least 300 (256 bytes + merges)")
    if min_frequency < 1:  # was the tokenizers library's OverflowError
        raise TokenizerError(f"--min-frequency {min_frequency}: give 1 or more (how often a pair must occur to be "
                             f"merged)")
    _check_output(Path(output), overwrite)  # before the training, which takes hours on a real corpus
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=["<|endoftext|>", "<pad>", "<|begin_of_text|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((doc.text for doc in iter_documents(files, opts=opts)), trainer=trainer)
    from scaletrain.files import whole_or_absent

    with whole_or_absent(Path(output)) as tmp:
        tmp.write_text(tok.to_str(pretty=True), encoding="utf-8")  # the bytes tok.save writes, failing as OSError
    return output, tok.get_vocab_size(with_added_tokens=True)


def _check_output(path: Path, overwrite: bool) -> None:
    """Refuse, before training, an output that is a folder, one that exists (shards prepared with it record its
    hash: replaced, they no longer train with it) unless ``overwrite``, and a folder that cannot be written."""
    if path.is_dir():
        raise TokenizerError(f"--output {path} is a folder; give the file to write, e.g. {path / 'tokenizer.json'}")
    if path.exists() and not overwrite:
        raise TokenizerError(f"--output {path} exists; shards prepared with it record its hash and train only with "
                             f"it. Give another --output, or --overwrite to replace it")
    from scaletrain.files import ensure_writable

    try:
        ensure_writable(path.parent)
    except OSError as e:
        raise TokenizerError(f"--output {path}: its folder cannot be written ({e.strerror or e})") from e


# ---- Hugging Face export -------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_level_hf_tokenizer():
    """The byte tokenizer as a ``tokenizers.Tokenizer``: id b for byte b (a BPE with no merges over
    the ByteLevel alphabet), then ``<|endoftext|>`` = 256 and ``<pad>`` = 257."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    table = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    b = ByteTokenizer
    tok.add_special_tokens([AddedToken(b.eos_token, special=True, normalized=False),
                            AddedToken(b.pad_token, special=True, normalized=False)])
    assert tok.token_to_id(b.eos_token) == b.eos_id and tok.token_to_id(b.pad_token) == b.pad_id
    return tok


def _adds_tokens(pp: dict | None) -> bool:
    if not pp:
        return False
    if pp.get("type") == "Sequence":
        return any(_adds_tokens(p) for p in pp.get("processors", []))
    return pp.get("type") in ("TemplateProcessing", "BertProcessing", "RobertaProcessing")


def _bos_template(token: str, token_id: int) -> dict:
    special = {"SpecialToken": {"id": token, "type_id": 0}}
    return {"type": "TemplateProcessing",
            "single": [special, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [special, {"Sequence": {"id": "A", "type_id": 0}},
                     special, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {token: {"id": token, "ids": [token_id], "tokens": [token]}}}


def export_hf_tokenizer(info: TokenizerInfo, tokenizer_json: Path | None, out: Path,
                        model_max_length: int) -> list[str]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out`` so that
    ``AutoTokenizer`` encodes text to the ids training saw: the special tokens are the ones prepare
    used, and a BOS is added exactly when prepare added one (a post-processor that adds tokens
    prepare never wrote is replaced). Returns the file names written."""
    from tokenizers import Tokenizer

    if info.kind == "byte":
        data = json.loads(byte_level_hf_tokenizer().to_str())
    else:
        if tokenizer_json is None or not Path(tokenizer_json).is_file():
            raise TokenizerError(f"tokenizer {info.name} ({info.identity[:19]}...) has no tokenizer.json to export")
        data = json.loads(Path(tokenizer_json).read_text())
    pp = data.get("post_processor")
    keep = [] if pp is None or _adds_tokens(pp) else [pp]
    if info.add_bos:
        keep.append(_bos_template(info.bos_token, info.bos_id))
    data["post_processor"] = None if not keep else keep[0] if len(keep) == 1 else {"type": "Sequence",
                                                                                    "processors": keep}
    text = json.dumps(data, ensure_ascii=False)
    tok = Tokenizer.from_str(text)
    bare = tok.encode(PROBE, add_special_tokens=False).ids
    assert tok.encode(PROBE).ids == ([info.bos_id] if info.add_bos else []) + bare, "post-processor mismatch"
    for t, i in ((info.eos_token, info.eos_id), (info.pad_token, info.pad_id), (info.bos_token, info.bos_id)):
        if t is not None and tok.token_to_id(t) != i:
            raise TokenizerError(f"tokenizer {info.name}: {t!r} has id {tok.token_to_id(t)}, training used {i}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    special = {"eos_token": info.eos_token, "pad_token": info.pad_token}
    if info.bos_token is not None:
        special["bos_token"] = info.bos_token
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": model_max_length,
              "add_bos_token": info.add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False}
    if info.chat_template:
        # the model folder's, for the model's later fine-tuning and use. Its special tokens must read as tokens,
        # which split_special_tokens would stop in every text: a literal "</s>" in a text then reads as the token,
        # as in Llama 3's own Hugging Face tokenizer (its tiktoken training encoder read it as text)
        config["chat_template"] = info.chat_template
    elif not info.parse_special:
        # training saw the characters of a literal "</s>" or "<pad>" in a text, never the special id: keep it so
        config["split_special_tokens"] = True
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
