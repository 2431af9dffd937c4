"""Where a run's starting weights come from: a seed (``RandomWeights``) or files (``checkpoint/init_from.py``).

A source yields ``(parameter name, get)`` pairs in the order it must be read; ``get(shape, index, device)``
returns the full tensor's ``index`` (a tuple of slices, or None for all of it). The engines decide what
each rank asks for: a rank that holds a slice of a parameter asks for that slice, and a file source reads
only those bytes. Each ``get`` is called at most once, in order.
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import torch

Getter = Callable[[torch.Size, "tuple[slice, ...] | None", "torch.device | str | None"], torch.Tensor]


class WeightSource(Protocol):
    description: str

    def items(self, model) -> Iterator[tuple[str, Getter]]: ...


class RandomWeights:
    """The model's own initialisation (``Llama.init_plan``) drawn from ``seed``. Every rank that asks draws the
    whole tensor and keeps its slice, so the weights are the same for any world size and any sharding."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.description = f"random initialisation (seed {seed})"

    def items(self, model) -> Iterator[tuple[str, Getter]]:
        torch.manual_seed(self.seed)  # every device's generator
        for name, std in model.init_plan():
            def get(shape, index=None, device=None, name=name, std=std):
                full = model.initial_value(name, std, shape, device)
                return full if index is None else full[index]

            yield name, get


class ResumedWeights:
    """A run that resumes a checkpoint: loading it writes every parameter, so the parameters are only zeroed
    (this rank's shard or partition; a memset, where random weights would have every rank draw every whole
    tensor, minutes at 7B on a host) and nothing is read or drawn."""

    description = "the checkpoint this run resumes"

    def items(self, model) -> Iterator[tuple[str, Getter]]:
        with torch.no_grad():
            for p in model.parameters():
                local = getattr(p, "ds_tensor", None)  # a ZeRO-3 partition
                if local is None:
                    local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 shard, or a whole tensor
                local.zero_()
        yield from ()
