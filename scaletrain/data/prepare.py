"""Text -> tokenized, packed WebDataset shards, one folder per domain.

    scaletrain prepare --domain arxiv --input papers/ more.jsonl.zst --output data/pretraining \\
        [--tokenizer tok.json] [--workers 2] [--val-fraction 0.01] [--latex-style source|text] [--text-key text]
    scaletrain prepare --input data/raw --output data/pretraining     # each sub-folder of data/raw a domain

Inputs are the formats corpora ship in (``sources.py``: JSON lines plain or .gz/.zst/.bz2, Parquet, text, LaTeX,
arXiv source packages and bulk tars), read as streams under a per-document cap. Files are cut into tasks that
``--workers`` processes read, clean and tokenize; the parent takes their pieces in task order (``encode.py``), drops
exact duplicates (content hash) and empty documents, and joins documents with EOS into tar members of
``--chunk-tokens`` tokens (raw little-endian uint16/uint32 arrays, key ``NNNNN_CCCCCC``, extension ``u16``/``u32``);
a shard holds up to ``--shard-tokens`` tokens (``writer.py``). Tars are written with webdataset's TarWriter in
USTAR format with mtime 0: the same bytes for the same input, whatever the number of workers. ``manifest.json``
lists the shards, their members' data offsets, token counts and checksums, the tokenizer with its special tokens,
and what was dropped and why (``manifest.py`` is the contract). ``--add-bos`` puts the tokenizer's BOS before
every document (recorded, so an export adds it exactly as training saw it); by default a tokenizer whose
post-processor puts one before a text (a Llama folder's) gets it, others not. The domain folder appears only when
complete (written under a temporary name, then renamed); an existing one is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import errno
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from scaletrain.faults import kill_between_renames

from .domain_folder import check_apart, not_a_preparation, recover_domain
from .encode import EncodeSpec, SeenHashes, SpillStats, encoded_pieces
from .manifest import MANIFEST, TOKENIZER_FILE, Manifest, Split
from .sources import SUFFIXES_HELP
from .text import InputError, ReadOptions, ReadStats, add_reading_args, plan_tasks, reading_options
from .tokenizer import load_tokenizer, token_dtype
from .writer import ShardWriter


def prepare_domain(domain: str, inputs: Sequence[str], output: str, tokenizer: str | None = None,
                   eos_token: str | None = None, workers: int = 1, val_fraction: float = 0.0,
                   shard_tokens: int = 2**26, chunk_tokens: int = 2**18, skip_bad_lines: bool = False,
                   overwrite: bool = False, quiet: bool = False, add_bos: bool | None = None,
                   bos_token: str | None = None, opts: ReadOptions | None = None, dedup: bool = True,
                   val_inputs: Sequence[str] = (), parse_special: bool = False) -> Manifest:
    """Prepare one domain; returns its manifest. ``opts`` (text key, LaTeX style, document cap) default to
    ``ReadOptions()``; ``skip_bad_lines`` is folded into them. ``dedup``: drop exact duplicates (memory: the
    content-hash table, 16 bytes per document, up to about 3x that while it grows). ``val_inputs``: the validation
    split from these files (a dataset's own, instead of ``val_fraction``); training documents equal to one of them
    are dropped and counted. ``add_bos`` None: as the tokenizer's post-processor does. ``parse_special``: a
    special token's string in a document becomes its id (otherwise it is encoded as text).

    One preparation of a domain at a time: ``<output>/.<domain>.lock`` (the checkpoint folders' lock) is held
    throughout, so a second one stops naming the first instead of deleting its work as a crash's leftovers."""
    args = dict(locals())
    if not domain or "/" in domain or "\\" in domain or domain.startswith(".") or domain != domain.strip() or \
            not domain.isprintable():  # a space at an end, a tab: --data-sources would have to repeat it
        raise InputError(f"--domain {domain!r}: use a plain folder name such as 'arxiv'")
    from scaletrain.checkpoint.lock import FolderLock

    lock = FolderLock(Path(output), f"prepare --domain {domain}", lock_name=f".{domain}.lock",
                      subject=f"--output {output}, domain {domain},",
                      advice=f"two preparations of one domain delete each other's work. Wait for it to end (if its "
                             f"host died, delete {Path(output) / f'.{domain}.lock'})")
    if lock.warning:
        print(f"scaletrain prepare: {lock.warning}", file=sys.stderr)
    try:
        return _prepare_domain(**args)
    finally:
        lock.release()


def _prepare_domain(domain: str, inputs: Sequence[str], output: str, tokenizer: str | None, eos_token: str | None,
                    workers: int, val_fraction: float, shard_tokens: int, chunk_tokens: int, skip_bad_lines: bool,
                    overwrite: bool, quiet: bool, add_bos: bool | None, bos_token: str | None,
                    opts: ReadOptions | None, dedup: bool, val_inputs: Sequence[str], parse_special: bool) -> Manifest:
    opts = opts if opts is not None else ReadOptions()
    opts = dataclasses.replace(opts, skip_bad_lines=opts.skip_bad_lines or skip_bad_lines)
    if opts.document_separator == "":
        raise InputError("--document-separator: an empty separator; give the string that ends each document")
    if workers < 1:
        raise InputError(f"--workers {workers}: give 1 or more processes")
    if not 0 <= val_fraction < 1:
        raise InputError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if val_inputs and val_fraction:
        raise InputError(f"--val-input and --val-fraction {val_fraction}: the validation split comes from one or the "
                         f"other; drop one")
    if chunk_tokens <= 0 or shard_tokens < chunk_tokens:
        raise InputError(f"--chunk-tokens {chunk_tokens} / --shard-tokens {shard_tokens}: need 0 < chunk <= shard")
    out = Path(output) / domain
    check_apart([*inputs, *val_inputs], out)
    for line in recover_domain(Path(output), domain):
        print(f"scaletrain prepare: {line}", file=sys.stderr)
    others = not_a_preparation(out) if out.exists() else []
    if others:  # --overwrite replaces the folder: whatever else is there would be lost
        raise InputError(f"--output: {out} holds files that no preparation writes ({', '.join(others[:4])}"
                         f"{' ...' if len(others) > 4 else ''}); the domain's shards go to --output/--domain, so "
                         f"give another --output (or --domain). Nothing was changed")
    if out.exists() and any(out.iterdir()) and not overwrite:
        state = "a complete preparation" if (out / MANIFEST).exists() else "shards but no manifest (incomplete)"
        raise InputError(f"--output: {out} already holds {state}; pass --overwrite to replace it "
                         f"(it is kept until the new one is complete)")
    tok = load_tokenizer(tokenizer, eos_token, bos_token, parse_special)
    if add_bos is None:  # as the tokenizer encodes a text: a Llama folder's puts its BOS first, a trained BPE none
        add_bos = tok.adds_bos
        if add_bos and not quiet:
            print(f"{domain}: {tok.bos_token} goes before every document, as {tok.name}'s post-processor puts it "
                  f"before a text (what the model it comes with was trained on); --no-add-bos leaves it out",
                  file=sys.stderr)
    tok_info = tok.info(add_bos)
    dtype = token_dtype(tok.vocab_size)
    stats = ReadStats()
    val_tasks = [dataclasses.replace(t, val=True)
                 for t in plan_tasks(val_inputs, stats.skipped_files, opts, leave_out_eval=False)]
    tasks = val_tasks + plan_tasks(inputs, stats.skipped_files, opts)  # validation first: its copies win
    spec = EncodeSpec(opts, tokenizer, eos_token, bos_token, val_fraction, dtype.name, parse_special)
    tmp = Path(output) / f".{domain}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in Path(output).glob(f".{domain}.tmp-*") if Path(output).exists() else []:
        shutil.rmtree(stale, ignore_errors=True)  # leftovers of an interrupted run (a live one holds the lock)
    train = ShardWriter(tmp, dtype, chunk_tokens, shard_tokens)
    val = ShardWriter(tmp / "val", dtype, chunk_tokens, shard_tokens)
    seen = SeenHashes() if dedup else None
    eos = np.array([tok.eos_id], dtype=dtype)
    bos = np.array([tok.bos_id] if add_bos else [], dtype=dtype)
    n_docs = n_val = duplicates = in_val = 0
    held_out = ValHashes() if val_tasks else None
    spelled: collections.Counter[str] = collections.Counter()  # documents that spell out a special token, by token
    spilled = SpillStats()
    t0 = last = time.time()
    try:
        for piece in encoded_pieces(tasks, spec, max(1, workers), stats, tmp / "spill", spilled):
            first = seen.add(piece.hashes) if seen is not None else np.ones(len(piece.hashes), dtype=bool)
            leak = held_out.leaks(piece) if held_out is not None else np.zeros(len(first), dtype=bool)
            duplicates += int((~first & ~leak).sum())
            in_val += int(leak.sum())
            first &= ~leak
            ends = np.cumsum(piece.lengths)
            for j in np.flatnonzero(first):  # in input order, whatever the number of workers
                target = val if piece.val[j] else train
                target.add(np.concatenate([bos, piece.tokens[ends[j] - piece.lengths[j]: ends[j]], eos]))
                if piece.special[j] >= 0:
                    spelled[tok.special_strings[piece.special[j]]] += 1
                n_docs += 1
                n_val += bool(piece.val[j])
            if not quiet and time.time() - last > 2:
                last = time.time()
                done = train.tokens + train.buffered + val.tokens + val.buffered
                print(f"  {domain}: {n_docs:,} documents, {done:,} tokens, {done / (last - t0):,.0f} tokens/s",
                      file=sys.stderr, flush=True)
        whole_txt = stats.oversize and any(t.kind == "txt" for t in tasks)
        hint = (" (a .txt file is one document unless --document-separator splits it; TinyStories ends its stories "
                "with '<|endoftext|>')") if whole_txt else ""
        if n_docs == 0:
            raise InputError(f"--domain {domain}: the inputs {list(inputs)} hold no documents"
                             + (f" (dropped: {_dropped_text(stats, duplicates, in_val)}{hint})"
                                if _dropped_text(stats, duplicates, in_val) else ""))
        shards, val_shards = train.finish(), val.finish()
        if not shards:
            raise InputError(f"--domain {domain}: every document went to validation; lower --val-fraction")
        elapsed = time.time() - t0
        dropped = dict(stats.dropped(), duplicates=duplicates, **({"in_validation": in_val} if val_tasks else {}))
        manifest = Manifest(domain=domain, dtype=dtype.name, chunk_tokens=chunk_tokens, tokenizer=tok_info,
                            train=Split(n_docs - n_val, train.tokens, shards), val=Split(n_val, val.tokens, val_shards),
                            inputs=[str(i) for i in inputs], skipped_bad_lines=stats.bad_lines,
                            empty_documents=stats.empty, val_fraction=val_fraction, dropped=dropped,
                            reading={"text_key": opts.text_key, "latex_style": opts.latex_style,
                                     "max_document_bytes": opts.max_document_bytes, "dedup": dedup,
                                     "document_separator": opts.document_separator,
                                     "val_inputs": [str(i) for i in val_inputs],
                                     "special_token_strings": dict(spelled.most_common()),
                                     "skipped_files": [list(x) for x in stats.skipped_files]})
        if tok.path:
            shutil.copyfile(tok.path, tmp / TOKENIZER_FILE)
        manifest.write(tmp)  # last: a folder with a manifest is complete (see _recover_domain)
        # commit: the old folder (if any) goes only once the new one is complete
        old = None
        if out.exists():
            old = Path(output) / f".{domain}.old-{os.getpid()}"
            out.rename(old)
            kill_between_renames()
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
        if not quiet:
            total = train.tokens + val.tokens
            dropped_text = _dropped_text(stats, duplicates, in_val)
            print(f"{domain}: {n_docs:,} documents ({n_val:,} held out), {train.tokens:,} train + {val.tokens:,} "
                  f"validation tokens in {len(shards)} + {len(val_shards)} shards, {elapsed:.1f}s "
                  f"({total / max(elapsed, 1e-9) / max(1, min(workers, len(tasks))):,.0f} tokens/s per worker)"
                  + (f"; dropped {dropped_text}{hint}" if dropped_text else "")
                  + (f"; {spilled.pieces:,} pieces ({spilled.bytes / 2**20:,.0f} MiB) waited on disk while their "
                     f"worker ran ahead" if spilled.pieces else ""), file=sys.stderr)
        if spelled and not quiet:
            print(_spelled_note(domain, spelled, parse_special), file=sys.stderr)
        for name, why in stats.skipped_files if not quiet else ():
            print(f"  skipped {name}: {why}", file=sys.stderr)
        if val_fraction and not n_val:  # a run on it reports no val_loss for the domain, as if none was asked for
            print(f"{domain}: warning: --val-fraction {val_fraction:g} held out none of its {n_docs:,} documents (each "
                  f"is held out by its content hash with that chance), so it has no validation split: give a larger "
                  f"--val-fraction (one document in {round(1 / val_fraction):,} is held out), or --val-input",
                  file=sys.stderr)
        return manifest
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        written = (train.tokens + val.tokens) * dtype.itemsize
        kept = f"the previous {out} is untouched" if out.exists() else f"nothing of {domain} was kept"
        raise InputError(f"--output {output}: the disk is full ({e.strerror} writing {e.filename}) after "
                         f"{written / 2**30:.2f} GiB of {domain}'s shards; {kept}. Free space there or choose "
                         f"another --output") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _spelled_note(domain: str, spelled: collections.Counter, parse_special: bool) -> str:
    """What prepare did with documents that spell out a special token's string, and the flag for the other way."""
    top = ", ".join(f"{t} in {n:,}" for t, n in spelled.most_common(3)) + (" ..." if len(spelled) > 3 else "")
    if parse_special:
        return (f"{domain}: {sum(spelled.values()):,} documents spell out special tokens ({top}): read as those tokens "
                f"(--parse-special-tokens); an end-of-text token there ends its document")
    return (f"{domain}: {sum(spelled.values()):,} documents spell out special tokens ({top}): encoded as text; if "
            f"they are meant as the tokens (chat-formatted data, say), prepare again with --parse-special-tokens")


_DROPPED = {"duplicates": "exact duplicates", "in_validation": "training documents equal to a --val-input one",
            "empty": "empty", "bad_lines": "bad lines", "oversize":
            "over --max-document-bytes", "link_members": "link members", "binary_members": "binary members",
            "no_main_file": "LaTeX packages without a main file"}


class ValHashes:
    """The content hashes of the --val-input documents (read first), to drop training documents equal to one: a
    document in both splits would make the validation loss a measure of memory."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.known: np.ndarray | None = None

    def leaks(self, piece) -> np.ndarray:
        """Which of a piece's documents are training copies of validation ones (none in a validation piece)."""
        if piece.val.all():  # validation pieces come first, whole
            self.parts.append(piece.hashes)
            return np.zeros(len(piece.hashes), dtype=bool)
        if self.known is None:
            self.known = np.unique(np.concatenate(self.parts)) if self.parts else np.zeros(0, np.uint64)
        return np.isin(piece.hashes, self.known)


def _dropped_text(stats: ReadStats, duplicates: int, in_val: int = 0) -> str:
    counts = dict(stats.dropped(), duplicates=duplicates, in_validation=in_val)
    parts = [f"{counts[k]:,} {what}" for k, what in _DROPPED.items() if counts.get(k)]
    if stats.latex_degraded:
        parts.append(f"(kept: {stats.latex_degraded:,} LaTeX documents cleaned from a tolerant parse)")
    return ", ".join(parts)


def domains_under(roots: Sequence[str]) -> dict[str, list[str]]:
    """``data/raw`` with ``arxiv/`` and ``general/`` inside: each sub-folder a domain (its name), in sorted order."""
    found: dict[str, list[str]] = {}
    for root in roots:
        p = Path(root)
        if not p.is_dir():
            raise InputError(f"--input {root}: without --domain each input must be a folder whose sub-folders are "
                             f"the domains (e.g. data/raw with data/raw/arxiv and data/raw/general)")
        subs = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subs:
            raise InputError(f"--input {root}: no sub-folders to take as domains; pass --domain NAME to prepare "
                             f"{root} itself as one domain")
        for d in subs:
            found.setdefault(d.name, []).append(str(d))
    return found


def add_prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", metavar="NAME", help="domain name, e.g. arxiv (one folder under --output); without "
                                                     "it, each sub-folder of each --input folder is a domain")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=f"files or folders (searched recursively; below a folder, files and folders named as an "
                        f"evaluation split, test/ or val.jsonl say, are left out): {SUFFIXES_HELP}")
    p.add_argument("--output", required=True, help="data folder, e.g. data/pretraining")
    p.add_argument("--tokenizer", help="a local Hugging Face tokenizer.json, or a model folder that has one (its "
                   "tokenizer_config.json names the EOS/BOS tokens; default: byte-level)")
    p.add_argument("--eos-token", help="end-of-text token of --tokenizer (default: found by name)")
    p.add_argument("--add-bos", action=argparse.BooleanOptionalAction, default=None,
                   help="put the tokenizer's begin-of-text token before every document, or not (recorded in the "
                        "manifest and the export). Default: as the tokenizer's own post-processor does: yes for a "
                        "Llama or Mistral folder (the model was trained so), no for a trained BPE or the byte level")
    p.add_argument("--bos-token", help="begin-of-text token of --tokenizer (default: found by name)")
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="a special token's string in a document (</s>, <|endoftext|>, <|im_start|>) becomes that "
                        "token's id, as Hugging Face tokenizers do by default: for texts written with them on purpose. "
                        "Default: encoded as the text it is, so that a page quoting one does not end its document "
                        "there (as Llama 3's and torchtitan's encoders do); recorded in the manifest and the export")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that read, clean and tokenize (default: every core with a Hugging Face "
                        "--tokenizer, LaTeX, compressed or Parquet inputs; 1 for plain text with the byte-level "
                        "tokenizer, a copy of the bytes, where one process is fastest); the output is the same for "
                        "any N")
    p.add_argument("--no-dedup", dest="dedup", action="store_false",
                   help="keep exact-duplicate documents (dropping them holds a content-hash table of 16 bytes per "
                        "document in memory; skip it for a corpus deduplicated upstream, e.g. FineWeb, SlimPajama)")
    p.add_argument("--val-input", nargs="+", default=[], metavar="PATH",
                   help="the validation split from these files (a dataset's own: c4-validation.*, SlimPajama's "
                        "validation/), read like --input, instead of --val-fraction; training documents equal to one "
                        "are dropped and counted (needs --domain)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of documents held out for validation (default: 0, none: runs then report no val_loss)")
    p.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per tar shard (default: 2^26)")
    p.add_argument("--chunk-tokens", type=int, default=2**18, help="tokens per tar member (default: 2^18)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing domain folder")
    add_reading_args(p)


def _default_workers(tokenizer: str | None, inputs: Sequence[str]) -> int:
    """Every core when there is work beyond copying bytes: a BPE tokenizer, LaTeX (parsed in pure Python, ~0.085
    MB/s), decompression or Parquet decoding (2 GB of .zst/.gz/Parquet with the byte-level tokenizer: two workers
    0.94x and 1.31x of one in two runs, benchmarks/prepare_bench.py). Plain JSONL or text with the byte-level
    tokenizer is a copy of the bytes: shipping its arrays between processes costs more than it saves (30M tokens/s
    in one process vs 10M with two)."""
    from .sources import kind_of
    from .text import list_inputs

    heavy = tokenizer is not None or any(kind_of(p) not in (("jsonl", None), ("txt", None))
                                         for p in list_inputs(list(inputs)))
    return (os.cpu_count() or 1) if heavy else 1


def run_prepare(args: argparse.Namespace) -> list[Manifest]:
    opts = reading_options(args)
    if args.val_input and not args.domain:
        raise InputError("--val-input is one domain's validation split: give --domain as well")
    domains = {args.domain: list(args.input)} if args.domain else domains_under(args.input)
    manifests = []
    for domain, inputs in domains.items():
        workers = args.workers if args.workers is not None else _default_workers(args.tokenizer, inputs)
        manifests.append(prepare_domain(domain, inputs, args.output, args.tokenizer, args.eos_token, workers,
                                        args.val_fraction, args.shard_tokens, args.chunk_tokens, args.skip_bad_lines,
                                        args.overwrite, add_bos=args.add_bos, bos_token=args.bos_token, opts=opts,
                                        dedup=args.dedup, val_inputs=args.val_input,
                                        parse_special=args.parse_special_tokens))
    return manifests


def main(argv: Sequence[str] | None = None) -> None:
    from scaletrain.cli import FlagParser
    from scaletrain.errors import run_entry

    p = FlagParser(prog="scaletrain prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prepare_args(p)
    args = p.parse_args(argv)
    run_entry(lambda: run_prepare(args))


if __name__ == "__main__":
    main()
