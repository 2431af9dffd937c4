"""``--init-from PATH``: starting weights from a Hugging Face model folder or a scaletrain checkpoint.

Only the weights are taken (the optimizer, schedule and data position start fresh). A Hugging Face folder
is read from ``config.json`` and the weight files transformers would read (``weight_files``),
tensor by tensor, each rank reading only the rows it holds (safetensors slices are reads of those bytes).
A folder with only ``pytorch_model*.bin`` is read with ``torch.load(weights_only=True, mmap=True)``: a
pickle that names code is refused before anything runs. A scaletrain checkpoint (any engine, any world
size; a checkpoint_dir means its newest complete checkpoint) is read through its engine's tensor reader.
No Python file of the folder is imported and no code is fetched: its weights and JSON only.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Iterator

import torch

from scaletrain.model import Llama, ModelConfig
from scaletrain.model.config_io import from_hf_config, read_config_file, trained_positions
from scaletrain.model.llama import from_hf_state_dict_key
from scaletrain.model.weights import Getter

from .safe import refused
from .store import COMPLETE, CheckpointError, checkpoint_folder, read_meta

IGNORED_HF_KEYS = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


def expected_shapes(mc: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``mc`` (a tied lm_head is the embedding, not its own tensor)."""
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in Llama(mc, init=False).named_parameters()}


def _check(source: str, found: dict[str, tuple[int, ...]], mc: ModelConfig) -> None:
    want = expected_shapes(mc)
    for name, shape in want.items():
        if name not in found:
            raise CheckpointError(f"--init-from {source}: no tensor {name} (the model needs {list(shape)})")
        if tuple(found[name]) != shape:
            raise CheckpointError(f"--init-from {source}: tensor {name} has shape {list(found[name])}, the model "
                                  f"needs {list(shape)}")
    extra = sorted(set(found) - set(want) - ({"lm_head.weight"} if mc.tie_embeddings else set()))
    if extra:
        raise CheckpointError(f"--init-from {source}: tensor {extra[0]} has no place in the model"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))


def check_same_shape(source: ModelConfig, run: ModelConfig, path: str, warn_changes: bool = True,
                     rows: int | None = None) -> None:
    """The run's model (--model-config, --num-layers) must have the source's tensors and shapes; other fields
    that differ (RoPE, norm epsilon) are the run's choice, and said once, as are training ``rows`` (tokens) longer
    than the positions the source knows."""
    _check(path, expected_shapes(source), run)
    if not warn_changes:
        return
    from dataclasses import fields

    from .store import warn

    for f in fields(ModelConfig):
        a, b = getattr(source, f.name), getattr(run, f.name)
        if a != b and f.name not in ("max_seq_len", "init_std"):
            warn(f"--init-from {path} has {f.name}={a!r}; this run uses {b!r}")
    if rows is not None and rows > source.max_seq_len:  # longer than the source's positions: a context extension
        rope = f"theta {run.rope_theta:g}" + (f", {run.rope_scaling} scaling" if run.rope_scaling else "")
        warn(f"--init-from {path} knows {source.max_seq_len} positions (max_position_embeddings, or the length a "
             f"checkpoint trained at); rows of {rows} tokens go past them with the run's RoPE ({rope}). "
             f"That extends its context; recipes for it usually raise rope_theta or scale RoPE too (--model-config "
             f"with the source's shape and rope_theta / rope_scaling)")


def weight_files(folder: Path) -> tuple[str, list[Path]]:
    """The weight files of a Hugging Face folder, chosen as transformers chooses them: ``model.safetensors``, else
    the files ``model.safetensors.index.json`` names, else the same for ``pytorch_model.bin``. Repositories ship
    others beside them (Mistral's ``consolidated.safetensors`` in its own names, a fine-tune's
    ``adapter_model.safetensors``); only a folder without those names is read from every ``*.safetensors`` (or
    ``pytorch_model*.bin``) it holds."""
    kinds = (("safetensors", "model.safetensors", "*.safetensors"),
             ("pytorch_model.bin", "pytorch_model.bin", "pytorch_model*.bin"))
    for kind, single, _ in kinds:
        if (folder / single).is_file():
            return kind, [folder / single]
        index = folder / f"{single}.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"--init-from {folder}: {index.name} is not a weight index ({e!r})") from None
            for name in names:
                if not (folder / name).is_file():
                    raise CheckpointError(f"--init-from {folder}: {name}, which {index.name} names, is missing (a "
                                          f"download cut short? fetch the folder again)")
            return kind, [folder / n for n in names]
    for kind, _, pattern in kinds:
        files = sorted(folder.glob(pattern))
        if files:
            return kind, files
    raise CheckpointError(f"--init-from {folder}: no *.safetensors or pytorch_model*.bin weights")


def _exported_tokenizer(folder: Path) -> dict | None:
    """The run's tokenizer (its manifest description) that ``launch/convert.py`` recorded in its export, or None."""
    from scaletrain.convert import EXPORT_RECORD

    try:
        record = json.loads((folder / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    tok = record.get("tokenizer") if isinstance(record, dict) else None
    return tok if isinstance(tok, dict) and isinstance(tok.get("identity"), str) else None


def read_generation_config(folder: Path) -> dict | None:
    """The folder's ``generation_config.json`` (its model's decoding defaults and end-of-text ids), which the export
    carries as ``save_pretrained`` would; None without one. A file that is not a JSON object is warned about and
    left out: it changes nothing in training."""
    f = folder / "generation_config.json"
    if not f.is_file():
        return None
    try:
        found = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        found = e
    if not isinstance(found, dict):
        from .store import warn

        warn(f"--init-from {folder}: {f.name} is not a JSON object ({found!r:.80}); the export will not carry it")
        return None
    return found


def _damaged(f: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"--init-from {f.parent}: {f.name} is not a whole weight file ({type(e).__name__}: "
                           f"{(str(e).splitlines() or [''])[0][:100]}; {f.stat().st_size:,} bytes): a download cut "
                           f"short? Fetch it again")


class HFWeights:
    """A local Hugging Face model folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        cfg = self.folder / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"--init-from {folder}: no config.json (expected a Hugging Face model folder or a "
                                  f"scaletrain checkpoint)")
        self.hf_config = read_config_file(cfg, "--init-from")
        self.model_config = from_hf_config(self.hf_config, str(cfg))
        self.kind, files = weight_files(self.folder)
        self._where: dict[str, tuple[Path, str]] = {}  # our name -> (file, its key there)
        found: dict[str, tuple[int, ...]] = {}
        if self.kind == "safetensors":
            from safetensors import safe_open

            for f in files:
                try:
                    h = safe_open(str(f), "pt")
                except Exception as e:  # safetensors' own error: a header that does not cover the file
                    raise _damaged(f, e) from None
                with h:
                    for key in h.keys():
                        if key.endswith(IGNORED_HF_KEYS):
                            continue
                        name = from_hf_state_dict_key(key)
                        self._where[name] = (f, key)
                        found[name] = tuple(h.get_slice(key).get_shape())
        else:
            for f in files:
                sd = self._torch_load(f)
                for key, t in sd.items():
                    if key.endswith(IGNORED_HF_KEYS):
                        continue
                    name = from_hf_state_dict_key(key)
                    self._where[name], found[name] = (f, key), tuple(t.shape)
                del sd  # unmapped: see _read
        _check(str(folder), found, self.model_config)
        tok = self.folder / "tokenizer.json"
        self.tokenizer_json = tok if tok.is_file() else None
        # an export of ours names the run's tokenizer, of which its tokenizer.json is the Hugging Face form
        self.tokenizer = _exported_tokenizer(self.folder) if self.tokenizer_json is not None else None
        self.generation_config = read_generation_config(self.folder)
        self.description = f"Hugging Face model {self.folder} ({self.hf_config.get('model_type')}, {self.kind})"

    def _torch_load(self, f: Path) -> dict:
        try:  # mmap: tensors stay in the file until read; weights_only: a pickle naming code is refused (always: a
            # state dict of tensors needs nothing else, so --trust-checkpoint changes nothing here)
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except pickle.UnpicklingError as e:
            raise refused(f, e) from None
        except (RuntimeError, EOFError, ValueError) as e:  # not a whole torch.save archive
            raise _damaged(f, e) from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"--init-from: {f} does not hold a state dict")
        return sd

    def _read(self, name: str, index) -> torch.Tensor:
        # a file is opened per tensor: both formats map the whole file, and the pages a read touches stay in this
        # process's memory while the mapping lives (reading half of every tensor of a 2.7 GB safetensors file
        # through one handle left 1.47 GB resident; reopening, 0.26 GB at the peak). A .bin's mapping lives as
        # long as any tensor of its torch.load does: the slice is copied out and the rest dropped.
        f, key = self._where[name]
        if self.kind != "safetensors":
            t = self._torch_load(f)[key]
            return (t if index is None else t[index]).clone()
        from safetensors import safe_open

        with safe_open(str(f), "pt") as h:
            t = h.get_tensor(key) if index is None else h.get_slice(key)[index]
            return t.clone()

    def items(self, model) -> Iterator[tuple[str, Getter]]:
        for name, _ in model.named_parameters():
            def get(shape, index=None, device=None, name=name):
                return self._read(name, index).to(device=device)

            yield name, get


class CheckpointWeights:
    """The model weights of a scaletrain checkpoint, through the engine's own tensor reader."""

    def __init__(self, path: str | Path, trust: bool = False) -> None:
        self.path = checkpoint_folder(str(path), "--init-from",
                                      also="a Hugging Face model folder (config.json and *.safetensors)")[0]
        meta = read_meta(self.path)
        mc = ModelConfig(**meta["model_config"])
        # the next phase starts from the length this one trained at (a preset's shape carries a 4096-row RoPE table)
        self.model_config = dataclasses.replace(mc, max_seq_len=trained_positions(meta.get("config", {}), mc))
        from scaletrain.engine import get_engine_class

        self.reader = get_engine_class(meta["engine"]).tensor_reader(str(self.path), trust=trust)
        _check(str(self.path), {n: s for n, (s, _) in self.reader.shapes.items()}, self.model_config)
        tok = self.path / "tokenizer" / "tokenizer.json"
        self.tokenizer_json = tok if tok.is_file() else None
        self.tokenizer = meta.get("tokenizer")
        self.generation_config = meta.get("generation_config")  # the model folder's the run started from, if any
        self.description = (f"scaletrain checkpoint {self.path} (step {meta['step']}, {meta['engine']} engine, "
                            f"{meta['world_size']} rank(s))")

    def items(self, model) -> Iterator[tuple[str, Getter]]:
        for name, _ in model.named_parameters():
            def get(shape, index=None, device=None, name=name):
                t = self.reader.load([name])[name]
                return (t if index is None else t[index]).to(device=device)

            yield name, get


def open_init_source(path: str, trust: bool = False) -> HFWeights | CheckpointWeights:
    """The weights at ``path``: a scaletrain checkpoint (or a folder of them), else a Hugging Face folder."""
    p = Path(path)
    if not p.is_dir():
        from scaletrain.files import hub_hint

        raise CheckpointError(f"--init-from {path}: no such folder{hub_hint(path)}")
    if (p / COMPLETE).is_file():
        return CheckpointWeights(p, trust)
    if not (p / "config.json").is_file():
        _not_a_model_folder(p, path)
        return CheckpointWeights(p, trust)  # a folder of checkpoints, or the error that says it holds none
    return HFWeights(p)


def _not_a_model_folder(p: Path, given: str) -> None:
    """Weights that are not a Hugging Face folder for want of its config.json: say what the folder is."""
    if (p / "params.json").is_file() and any(p.glob("consolidated.*.pth")):
        up = p.parent / "config.json"
        raise CheckpointError(
            f"--init-from {given}: Meta's original format (params.json, consolidated.*.pth), which is not read here"
            + (f"; the Hugging Face folder above it has the same weights: --init-from {p.parent}" if up.is_file() else
               "; convert it with transformers' convert_llama_weights_to_hf.py, or download the Hugging Face "
               "files (config.json, *.safetensors) of the model"))
    weights = sorted(q.name for q in [*p.glob("*.safetensors"), *p.glob("pytorch_model*.bin")])
    if weights:
        raise CheckpointError(f"--init-from {given}: holds {weights[0]}{' and more' if len(weights) > 1 else ''} "
                              f"but no config.json, which a Hugging Face model folder needs for the model's shape; "
                              f"copy it from where the weights came from")
