"""Sharded checkpoint (DeepSpeed ZeRO-2/3 or FSDP2/DCP) -> Hugging Face safetensors, streaming.

    python launch/convert.py CKPT_DIR OUT_DIR [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--overwrite]

CKPT_DIR is a checkpoint folder (``step_000500``, ``final``, ...) or a checkpoint_dir (its newest
complete checkpoint is taken). Only the checkpoint is read: the engine's shards, ``COMPLETE.json``
(model shape, trained sequence length, the tokenizer's special tokens) and the tokenizer it carries.
Tensors are read a few at a time through the engine's own reader (DCP: chosen keys in one process;
DeepSpeed: zero_to_fp32 in lazy mode) and written one output shard at a time, so peak memory stays
near one shard, not the model. Output: ``config.json`` (LlamaConfig), ``generation_config.json``,
``model.safetensors`` or ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``,
Hugging Face parameter names, and ``tokenizer.json``, ``tokenizer_config.json`` and
``special_tokens_map.json`` for the tokenizer the run used (the byte-level one included), whose ids
equal the training ids, with ``scaletrain_export.json`` (the checkpoint, its step and the run's tokenizer, so that
``--init-from`` the export takes the shards the run trained on). The JSON files are written directly, so
converting needs no transformers.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shutil
from pathlib import Path

import torch

from scaletrain.checkpoint import TOKENIZER_DIR, CheckpointError, read_meta
from scaletrain.checkpoint.integrity import verify_folder
from scaletrain.checkpoint.store import checkpoint_folder
from scaletrain.data.manifest import TokenizerInfo
from scaletrain.model import Llama, ModelConfig, hf_state_dict_key
from scaletrain.model.config_io import to_hf_config, trained_positions

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes, '512MiB' -> 512 * 2**20, '1000' -> 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), flags=re.I)
    if not m:
        raise CheckpointError(f"--max-shard-size {text!r}: use a size such as 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise CheckpointError(f"--max-shard-size {text!r}: must be above zero (a tensor larger than the limit gets a "
                              f"file of its own)")
    return size


def hf_config(mc: ModelConfig, dtype: str, max_positions: int, tok: TokenizerInfo | None) -> dict:
    """The Hugging Face config; ``max_position_embeddings`` is the length the model was trained at."""
    return to_hf_config(mc, dtype, max_positions, tok.bos_id if tok else None, tok.eos_id if tok else None,
                        tok.pad_id if tok else None)


def generation_config(tok: TokenizerInfo | None, carried: dict | None = None) -> dict:
    """The export's ``generation_config.json``: the token ids of the run's tokenizer, over the one ``carried`` from
    --init-from's model folder (as ``save_pretrained`` carries a model's): its decoding defaults stay, and its
    end-of-text ids stay beside the tokenizer's (Llama 3 Instruct stops at ``<|eom_id|>`` and ``<|eot_id|>`` too)."""
    out = {k: v for k, v in (carried or {}).items() if k != "transformers_version"}
    ours = {"bos_token_id": tok.bos_id if tok else None, "eos_token_id": tok.eos_id if tok else None,
            "pad_token_id": tok.pad_id if tok else None}
    for key, mine in ours.items():
        theirs = out.get(key)
        if key == "eos_token_id" and mine is not None and theirs is not None:
            theirs = theirs if isinstance(theirs, list) else [theirs]
            out[key] = theirs if mine in theirs else [mine, *theirs]
        elif mine is not None or key not in out:
            out[key] = mine
    return out


_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_safetensors(path: Path, items: list[tuple[str, tuple, str]], fetch, dtype: torch.dtype) -> int:
    """Write a safetensors file one tensor at a time: the header (all shapes are known up front), then
    each tensor's bytes as ``fetch(key)`` produces it. Memory holds one tensor, not the file (safetensors'
    save_file serialises the whole shard in memory first). Returns the bytes of tensor data."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in items:
        nbytes = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, shape, key in items:
            t = fetch(key).to(dtype).contiguous()
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"tensor {key} came back with shape {list(t.shape)}, expected {list(shape)}")
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))  # no copy of the tensor's bytes
            del t
    return offset


def convert(ckpt: str, out: str, dtype: str = "bf16", max_shard_size: str | int = "5GB",
            overwrite: bool = False, quiet: bool = False, trust_checkpoint: bool = False, verify: bool = True) -> Path:
    if dtype not in DTYPES:
        raise CheckpointError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    limit = parse_size(max_shard_size) if isinstance(max_shard_size, str) else int(max_shard_size)
    path = checkpoint_folder(ckpt, "convert")[0]
    meta = read_meta(path)
    bad = verify_folder(path, meta, 0, 1) if verify else []
    if bad:  # an export of damaged weights would look fine and be wrong
        raise CheckpointError(f"checkpoint {path} is damaged: {bad[0]}" + (f" (and {len(bad) - 1} more)" if
                              len(bad) > 1 else "") + "; convert another checkpoint (or pass --no-verify-checkpoint)")
    out_dir = Path(out)
    if out_dir.resolve() == path.resolve() or out_dir.resolve() in path.resolve().parents:
        raise CheckpointError(f"output folder {out} holds the checkpoint being converted ({path}); choose an output "
                              f"folder outside it")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output {out} is a file; give a folder to write the Hugging Face model into")
    try:  # before the conversion: a folder that cannot be made fails now, not after the tensors are read
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = f"{e.filename} is a file" if e.errno == errno.EEXIST else e.strerror or e
        raise CheckpointError(f"output folder {out} cannot be made ({why}); choose another") from e
    previous = out_dir.exists() and any(out_dir.iterdir())
    if previous and not overwrite:
        raise CheckpointError(f"output folder {out} is not empty; pass --overwrite to replace its contents")
    others = _not_an_export(out_dir) if previous else []
    if others:  # --overwrite deletes the folder: a run folder given by mistake would lose its logs and checkpoints
        raise CheckpointError(f"output folder {out} holds more than a Hugging Face export ({', '.join(others[:4])}"
                              f"{' ...' if len(others) > 4 else ''}), and --overwrite replaces only an earlier export; "
                              f"choose another output folder. Nothing was changed")
    mc = ModelConfig(**meta["model_config"])
    from scaletrain.engine import get_engine_class

    reader = get_engine_class(meta["engine"]).tensor_reader(str(path), trust=trust_checkpoint)
    # expected names and shapes, in the model's own order
    with torch.device("meta"):
        expected = [(n, tuple(p.shape)) for n, p in Llama(mc).named_parameters()]
    for name, shape in expected:
        if name not in reader.shapes:
            raise CheckpointError(f"checkpoint {path} has no tensor {name} (model {mc})")
        if reader.shapes[name][0] != shape:
            raise CheckpointError(f"checkpoint {path}: tensor {name} has shape {list(reader.shapes[name][0])}, "
                                  f"the model config says {list(shape)}")
    # group tensors into output shards by their size in the output dtype
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in expected:
        nbytes = itemsize * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if not quiet:
        print(f"converting {path}: step {meta['step']}, {meta['engine']} engine, saved by "
              f"{meta['world_size']} rank(s) -> {out_dir}", flush=True)
    # written into a sibling folder, renamed into place once complete: a failure (a full disk) leaves no partial
    # export, and --overwrite replaces the previous one only then
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        n = len(groups)
        weight_map, total = {}, 0
        shapes = dict(expected)
        for i, names in enumerate(groups):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            nbytes = write_safetensors(tmp / fname, [(hf_state_dict_key(k), shapes[k], k) for k in names],
                                       lambda k: reader.load([k])[k], DTYPES[dtype])
            total += nbytes
            weight_map.update({hf_state_dict_key(k): fname for k in names})
            if not quiet:
                print(f"  wrote {fname}: {len(names)} tensors, {nbytes / 2**20:,.1f} MiB", flush=True)
        if n > 1:
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        tok = TokenizerInfo.from_dict(meta["tokenizer"]) if meta.get("tokenizer") else None
        max_positions = trained_positions(meta.get("config", {}), mc)
        (tmp / "config.json").write_text(json.dumps(hf_config(mc, dtype, max_positions, tok), indent=2))
        generation = generation_config(tok, meta.get("generation_config"))
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        written = ["config.json", "generation_config.json"]
        if tok is not None:
            from scaletrain.data.tokenizer import export_hf_tokenizer

            written += export_hf_tokenizer(tok, path / TOKENIZER_DIR / "tokenizer.json", tmp, max_positions)
            # where it came from: the tokenizer.json above is the Hugging Face form of the run's tokenizer (byte-level
            # or the file the shards name), so --init-from this folder takes the shards the run trained on
            (tmp / EXPORT_RECORD).write_text(json.dumps({"checkpoint": str(path), "step": meta["step"],
                                                         "tokenizer": meta["tokenizer"]}, indent=2))
            written.append(EXPORT_RECORD)
        _put_in_place(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, (KeyboardInterrupt, SystemExit)) and not _still_there(path, meta):
            kept = " (the earlier export there is untouched)" if previous else ""
            raise CheckpointError(
                f"checkpoint {path} was deleted or replaced while it was being converted (a run still training in "
                f"{path.parent} deletes older step_* folders, --keep-last-n-checkpoints, and re-saves best and "
                f"final); nothing was written to {out}{kept}. Convert one that run keeps (its newest), or after it "
                f"ends, or a copy (cp -al {path} <copy> makes one without copying the data)") from e
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            raise CheckpointError(f"{out}: the disk is full ({e.strerror}{where}); nothing was written there"
                                  f"{' and the previous export is untouched' if previous else ''}. Free space there "
                                  f"or choose another output folder") from e
        raise
    if not quiet:
        print(f"  wrote {', '.join(written)}" + (f" (tokenizer {tok.name}: eos {tok.eos_token!r}={tok.eos_id}, pad "
                                                 f"{tok.pad_token!r}={tok.pad_id}"
                                                 + (f", bos {tok.bos_token!r}={tok.bos_id}" if tok.bos_token else "")
                                                 + f", add_bos {tok.add_bos})" if tok else
                                                 " (no tokenizer: the run trained on synthetic token ids)"))
        print(f"converted: {n} safetensors shard(s), {total / 2**20:,.1f} MiB {dtype}, {mc.n_layers} layers, "
              f"vocab {mc.vocab_size}, trained at {max_positions} tokens\n"
              f"load it with: AutoModelForCausalLM.from_pretrained({str(out_dir)!r})"
              + (f" and AutoTokenizer.from_pretrained({str(out_dir)!r})" if tok else ""), flush=True)
    return out_dir


def _still_there(path: Path, meta: dict) -> bool:
    """Whether ``path`` still holds the checkpoint whose ``COMPLETE.json`` was ``meta`` at the start."""
    try:
        return read_meta(path).get("saved_at") == meta.get("saved_at")
    except CheckpointError:
        return False


EXPORT_RECORD = "scaletrain_export.json"
EXPORT_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".md", ".jinja", ".gitattributes")


def _not_an_export(folder: Path) -> list[str]:
    """What in ``folder`` no Hugging Face model folder holds (sub-folders, logs, checkpoint files): a folder with
    any of it is not an earlier export for --overwrite to replace."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir()
                  if p.is_dir() or not p.name.endswith(EXPORT_SUFFIXES))


def _put_in_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished export to ``out_dir``; a previous export there is moved aside first, deleted after."""
    old = None
    if out_dir.exists() and any(out_dir.iterdir()):
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
    elif out_dir.exists():
        out_dir.rmdir()  # an empty folder the user made
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def add_convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="checkpoint folder, or a checkpoint_dir or a run's folder, runs/NAME (its newest "
                                "complete checkpoint)")
    p.add_argument("out", help="output folder (Hugging Face layout)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES),
                   help="dtype of the exported weights (default: bf16, what Hugging Face checkpoints ship; fp32 keeps "
                        "an fp32 run's weights exactly)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file; bigger models are split into "
                                                            "several with an index (default: 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in the output folder (a "
                   "folder holding anything else, a run folder say, is refused)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="read checkpoint files that name code to run while unpickling (refused by default); only "
                        "for checkpoints from a source you trust")
    p.add_argument("--no-verify-checkpoint", dest="verify", action="store_false",
                   help="skip checking the checkpoint's files against the checksums recorded at save")


def main(argv: list[str] | None = None) -> None:
    from scaletrain.cli import FlagParser

    p = FlagParser(prog="scaletrain convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_convert_args(p)
    a = p.parse_args(argv)
    from scaletrain.errors import run_entry

    run_entry(lambda: convert(a.ckpt, a.out, a.dtype, a.max_shard_size, a.overwrite,
                              trust_checkpoint=a.trust_checkpoint, verify=a.verify))
