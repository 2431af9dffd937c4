"""The contract between ``prepare`` (the writer) and everything that reads prepared shards.

A domain folder holds ``manifest.json``: the shards of the ``train`` split (and ``val/`` for the
held-out one), each member's data offset and token count, the token dtype, and the tokenizer
that produced the ids, with its special tokens by string AND id. Training reads only this
module and ``shards.py``: no webdataset, no writer.

Format 2 added the special-token strings, ``bos`` and ``add_bos``; format 1 manifests are
upgraded on read (their strings come from the tokenizer.json next to them, or the byte-level
table). Format 3 adds each member's XXH3-64 checksum (a fourth entry), checked on first read. Format 4 records
what reading dropped (``dropped``: duplicates, empty, bad lines, over-size, ...) and how it read (``reading``: text
key, LaTeX style, document cap, files skipped).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scaletrain.errors import ScaletrainError

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 4
RAW_SUFFIXES = (".jsonl", ".json", ".txt", ".tex", ".gz", ".zst", ".bz2", ".parquet")


class ShardError(ScaletrainError):
    """A missing, truncated or corrupt shard or manifest; the message names the file and member."""


@dataclass(frozen=True)
class TokenizerInfo:
    """What a tokenizer produced: enough to check a run against the shards and to export a working
    Hugging Face tokenizer (``kind`` byte: no file needed; hf: the tokenizer.json beside it)."""

    kind: str  # "byte" or "hf"
    name: str
    identity: str  # "byte-v1" or "sha256:<hex of tokenizer.json>"
    vocab_size: int
    eos_token: str
    eos_id: int
    pad_token: str
    pad_id: int
    bos_token: str | None = None
    bos_id: int | None = None
    add_bos: bool = False  # prepare put bos_id before every document
    # a special token's string in a document ("</s>" in a web page) became that token's id; False: its characters
    # were encoded as text. Manifests and checkpoints from before the field: True for "hf" (what they did)
    parse_special: bool = False
    chat_template: str | list | None = None  # a model folder's (--tokenizer FOLDER), carried to the export

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerInfo:
        fields = {k: d.get(k) for k in cls.__dataclass_fields__ if k in d}
        fields.setdefault("parse_special", d.get("kind") == "hf")
        return cls(**fields)


def check_same_tokenizing(infos: dict[str, TokenizerInfo]) -> None:
    """The domains of a run (name -> their manifest's tokenizer) must be tokenized alike: the same tokenizer, and
    the same ``--add-bos`` and ``--parse-special-tokens``; otherwise a ShardError naming each domain's."""
    if len({t.identity for t in infos.values()}) > 1:
        detail = ", ".join(f"{n}: {t.name} ({t.identity[:19]}...)" for n, t in infos.items())
        raise ShardError(f"--data-sources were prepared with different tokenizers ({detail}); prepare them all "
                         f"with the same --tokenizer")
    for flag, name in (("add_bos", "--add-bos"), ("parse_special", "--parse-special-tokens")):
        if len({getattr(t, flag) for t in infos.values()}) > 1:
            detail = ", ".join(f"{n}: {getattr(t, flag)}" for n, t in infos.items())
            raise ShardError(f"--data-sources were prepared with and without {name} ({detail}); prepare them all "
                             f"the same way")


@dataclass
class Shard:
    file: str
    tokens: int
    bytes: int
    members: list[list]  # [name, data offset in bytes, tokens, xxh3-64 of the data (format 3)]


@dataclass
class Split:
    documents: int
    tokens: int
    shards: list[Shard] = field(default_factory=list)


@dataclass
class Manifest:
    domain: str
    dtype: str
    chunk_tokens: int
    tokenizer: TokenizerInfo
    train: Split
    val: Split
    inputs: list[str] = field(default_factory=list)
    skipped_bad_lines: int = 0
    empty_documents: int = 0
    val_fraction: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)
    reading: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def split(self, name: str) -> Split:
        return self.train if name == "train" else self.val

    def to_json(self) -> str:
        # the train split's keys sit at the top level (format 1 layout, kept for readers of it)
        d = {"format": self.format, "domain": self.domain, "dtype": self.dtype, "chunk_tokens": self.chunk_tokens,
             "tokenizer": self.tokenizer.to_dict(), "documents": self.train.documents, "tokens": self.train.tokens,
             "shards": [asdict(s) for s in self.train.shards], "val": asdict(self.val), "inputs": self.inputs,
             "skipped_bad_lines": self.skipped_bad_lines, "empty_documents": self.empty_documents,
             "val_fraction": self.val_fraction, "dropped": self.dropped, "reading": self.reading}
        return json.dumps(d, indent=1)

    def write(self, folder: Path) -> None:
        (Path(folder) / MANIFEST).write_text(self.to_json())

    @classmethod
    def from_dict(cls, d: dict[str, Any], folder: Path) -> Manifest:
        tok = d["tokenizer"]
        if d.get("format", 1) < 2:
            tok = _upgrade_tokenizer_v1(tok, folder)

        def split(s: dict[str, Any]) -> Split:
            return Split(s["documents"], s["tokens"], [Shard(**x) for x in s["shards"]])

        return cls(domain=d["domain"], dtype=d["dtype"], chunk_tokens=d["chunk_tokens"],
                   tokenizer=TokenizerInfo.from_dict(tok),
                   train=split({"documents": d["documents"], "tokens": d["tokens"], "shards": d["shards"]}),
                   val=split(d["val"]), inputs=d.get("inputs", []), skipped_bad_lines=d.get("skipped_bad_lines", 0),
                   empty_documents=d.get("empty_documents", 0), val_fraction=d.get("val_fraction", 0.0),
                   dropped=d.get("dropped", {}), reading=d.get("reading", {}), format=FORMAT_VERSION)


def _upgrade_tokenizer_v1(tok: dict[str, Any], folder: Path) -> dict[str, Any]:
    if tok["identity"] == "byte-v1":
        return dict(tok, kind="byte", eos_token="<|endoftext|>", pad_token="<pad>")
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise ShardError(f"{folder / MANIFEST} (format 1) names tokenizer {tok['name']} but {path} is missing; "
                         f"prepare the domain again")
    vocab = {i: t for t, i in json.loads(path.read_text())["model"]["vocab"].items()}
    for added in json.loads(path.read_text()).get("added_tokens", []):
        vocab[added["id"]] = added["content"]
    return dict(tok, kind="hf", eos_token=vocab[tok["eos_id"]], pad_token=vocab[tok["pad_id"]])


def _raw_text_hint(d: Path) -> str:
    shards = sorted(p.name for p in d.glob("shard-*.tar"))
    if shards:  # prepare writes the manifest last and renames the folder in whole: this one lost its manifest
        return (f"it holds shards ({shards[0]}{f' and {len(shards) - 1} more' if len(shards) > 1 else ''}) but "
                f"not their manifest (deleted, or left out of a copy): copy {MANIFEST} back from where the shards "
                f"came from, or prepare the domain again (--overwrite)")
    raw = sorted(p.name for p in d.iterdir() if p.is_file() and p.name.endswith(RAW_SUFFIXES))
    if not raw:
        return "not a prepared domain, or its preparation did not finish"
    shown = ", ".join(raw[:3]) + (f" and {len(raw) - 3} more" if len(raw) > 3 else "")
    out = d.parent.parent / f"{d.parent.name}_prepared" if d.parent.name else Path("prepared")
    return (f"it holds raw text ({shown}), not prepared shards. Prepare it first:\n"
            f"  scaletrain prepare --domain {d.name} --input {d} --output {out}\n"
            f"(once per domain), then train with --data-dir {out}")


def _missing_domain_hint(d: Path) -> str:
    """What to do about a domain folder that is not there: the --data-dir one level down that has it (the sample's
    data/sample/pretraining given as data/sample), the domains the folder does hold, or the command to prepare it."""
    root = d.parent
    if root.is_dir():
        below = sorted(p.parent for p in root.glob(f"*/{d.name}/{MANIFEST}"))
        if below:
            return f"{below[0].parent} holds it: --data-dir {below[0].parent}"
        held = sorted(p.parent.name for p in root.glob(f"*/{MANIFEST}"))
        if held:
            return (f"--data-dir {root} holds the prepared domains {', '.join(held)} (--data-sources names them), or "
                    f"prepare it with `scaletrain prepare --domain {d.name} --input ... --output {root}`")
    elif root != Path("."):
        return (f"--data-dir {root} does not exist either; prepare a domain into it with "
                f"`scaletrain prepare --domain {d.name} --input ... --output {root}`")
    return f"prepare it with `scaletrain prepare --domain {d.name} --input ... --output {root}`"


def load_manifest(domain_dir: str | Path) -> Manifest:
    """The manifest of a prepared domain folder; errors say how to prepare one."""
    d = Path(domain_dir)
    if not d.is_dir():
        raise ShardError(f"data domain folder {d} does not exist; {_missing_domain_hint(d)}")
    path = d / MANIFEST
    if not path.is_file():
        raise ShardError(f"{d} has no {MANIFEST}: {_raw_text_hint(d)}")
    try:
        return Manifest.from_dict(json.loads(path.read_text()), d)
    except (ValueError, KeyError, TypeError) as e:  # ValueError: not JSON, or not UTF-8
        raise ShardError(f"{path}: corrupt manifest ({type(e).__name__}: {e}); prepare the domain again") from e
