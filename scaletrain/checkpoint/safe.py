"""Loading checkpoint files without running code from them.

A pickle can call any Python function while it loads. ``torch.load(weights_only=True)`` allows only
tensors, plain containers and an allowlist of types; what else a file names is refused before
anything runs. The run's own state is always read that way. Libraries that read their own files with
``weights_only=False`` (DeepSpeed's checkpoint engine, ``zero_to_fp32``, ``ds_to_universal``) run
inside ``weights_only_loads``, which makes every ``torch.load`` in the block a weights-only load with
the engine's allowlist. ``--trust-checkpoint`` turns it off for files one trusts.
"""

from __future__ import annotations

import pickle
import re
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from .store import CheckpointError

TRUST_HINT = "pass --trust-checkpoint only if you trust where this checkpoint came from"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that names code to run while loading; refused unless trusted."""


def refused(path: Any, error: BaseException) -> CheckpointError:
    """The error for a weights-only load that failed: code it would run (refused), or bytes that are no pickle
    at all (damaged)."""
    m = re.search(r"GLOBAL ([\w.]+)", str(error))
    if m:
        return UnsafeCheckpointError(f"{path} names {m.group(1)}, which loading it would run; refused ({TRUST_HINT})")
    detail = re.search(r"WeightsUnpickler error: (.*)", str(error))
    return CheckpointError(f"{path} is damaged or not a checkpoint file ("
                           f"{(detail.group(1) if detail else str(error).strip().splitlines()[0])[:200]})")


@contextmanager
def weights_only_loads(allowed_globals: list, trust: bool = False) -> Iterator[None]:
    """Inside the block, every ``torch.load`` is ``weights_only=True`` with ``allowed_globals`` added to
    torch's safe set, whatever its caller asked for; a refusal names the file. No-op when ``trust``."""
    if trust:
        yield
        return
    original = torch.load

    def load(f, *args: Any, **kwargs: Any):
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        try:
            with torch.serialization.safe_globals(allowed_globals):
                return original(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise refused(getattr(f, "name", f), e) from None

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def load_run_state(path) -> Any:
    """The run's own per-rank state: plain values and tensors only, never code."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise refused(path, e) from None
