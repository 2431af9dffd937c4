"""A prepared domain's folder: what prepare may write into it, and what a crash between its renames left.

``prepare --overwrite`` replaces ``--output/<domain>`` as a whole (the new preparation is written under
``.<domain>.tmp-<pid>``, the old one renamed to ``.<domain>.old-<pid>``, then the new one renamed into place), so the
inputs must lie outside it, nothing but a preparation may be in it, and a start after a crash finishes or undoes the
swap.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Sequence

from .manifest import MANIFEST
from .text import InputError


def recover_domain(root: Path, domain: str) -> list[str]:
    """Finish or undo an ``--overwrite`` that a crash interrupted between its two renames: a complete new
    preparation (it has a manifest) takes the missing domain folder's place, else the previous one is put back;
    leftover old copies are removed. Returns what it did."""
    out, done = root / domain, []
    for old in sorted(root.glob(f".{domain}.old-*")) if root.is_dir() else []:
        if not out.exists():
            new = next((t for t in sorted(root.glob(f".{domain}.tmp-*")) if (t / MANIFEST).is_file()), None)
            if new is not None:
                new.rename(out)
                done.append(f"{out}: committed the new preparation (a crash fell between its renames)")
            else:
                old.rename(out)
                done.append(f"{out}: restored the previous preparation (its replacement was incomplete)")
                continue
        shutil.rmtree(old, ignore_errors=True)
        done.append(f"removed {old.name}, the copy an interrupted --overwrite replaced")
    return done


def check_apart(inputs: Sequence[str], out: Path) -> None:
    """The domain folder is replaced as a whole: an input inside it would be deleted, and an input folder around it
    would read earlier preparations' shards back in as documents."""
    target = out.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if src == target or target in src.parents:
            elsewhere = out.parent.parent / (out.parent.name + "_prepared") if out.parent.name else "prepared"
            raise InputError(f"--input {item} is inside the domain folder {out} that prepare writes (and replaces "
                             f"with --overwrite); give an --output outside the inputs, e.g. --output {elsewhere}")
        if src in target.parents and src.is_dir():
            raise InputError(f"--output: the domain folder {out} is inside --input {item}, whose walk would read "
                             f"earlier preparations back in as documents; give an --output outside the inputs")


PREPARATION = re.compile(r"(manifest\.json|tokenizer\.json|shard-\d+\.tar)$")


def not_a_preparation(folder: Path) -> list[str]:
    """What in a domain folder prepare never writes (its manifest, tokenizer, shards and val/ of shards)."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_dir() and p.name == "val":
            found += [f"val/{q.name}" for q in sorted(p.iterdir()) if q.is_dir() or not PREPARATION.match(q.name)]
        elif p.is_dir() or not PREPARATION.match(p.name):
            found.append(p.name + ("/" if p.is_dir() else ""))
    return found
