"""Seeing inside a run: profiler traces of chosen steps, CUDA memory history and snapshots, allocator figures,
and an out-of-memory stop that says what to change.

``--profile-steps A:B``: a ``torch.profiler`` trace of optimizer steps A..B (1-based, inclusive), CPU and CUDA
activity with shapes and memory, written per rank (or rank 0 only with ``--profile-rank0-only``) as
``run_dir/run_name/profile/rank<R>.steps<A>-<B>.pt.trace.json``: Chrome trace JSON, which Perfetto
(ui.perfetto.dev) and chrome://tracing open, and TensorBoard's profiler plugin lists under the run folder.

``--memory-snapshot`` (CUDA): records the allocator's history from the start
(``torch.cuda.memory._record_memory_history``) and dumps ``memory_snapshot_oom.pickle`` when the run runs out
of memory, and ``memory_snapshot_step<N>.pickle`` after step ``--memory-snapshot-step N``; drag either into
pytorch.org/memory_viz.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scaletrain.config import parse_steps
from scaletrain.errors import ScaletrainError


class OutOfMemory(ScaletrainError):
    """The run needed more memory than the device has; the message says what to change."""


def is_oom(e: BaseException) -> bool:
    """A device or host allocation failure (CUDA's OutOfMemoryError, torch's CPU allocator, Python's own)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "out of memory" in str(e))


def oom_message(e: BaseException, cfg, step: int, estimate, snapshot: Path | None) -> str:
    """What ran out, where, and what to change: micro-batch, activation checkpointing, and the estimate."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    est = ""
    if estimate is not None:
        est = (f"; the estimate for this run is {estimate.peak_bytes / 2**30:.2f} GiB per device (peak at the "
               f"{estimate.moment}, `scaletrain estimate` with these flags and --world-size shows the table)")
        best = estimate.largest_micro_batch(cfg.micro_batch_size)
        if best is not None:
            est += f", largest micro-batch that fits by it: {best}"
    fixes = []
    if cfg.micro_batch_size > 1:
        fixes.append(f"a smaller --micro-batch-size than {cfg.micro_batch_size} (with --global-batch-size, or a "
                     f"larger --gradient-accumulation-steps, the batch stays the same)")
    if not cfg.gradient_checkpointing:
        fixes.append("--gradient-checkpointing (recompute each block in backward)")
    fixes.append("a shorter --max-seq-length or more ranks (the states shard over them)")
    where = f"; memory snapshot: {snapshot}" if snapshot else (
        "; --memory-snapshot records where the memory went" if torch.cuda.is_available() else "")
    return (f"out of memory in step {step + 1} (micro-batch {cfg.micro_batch_size} x {cfg.max_seq_length} tokens, "
            f"activation checkpointing {'on' if cfg.gradient_checkpointing else 'off'}): {first}{est}. Try "
            + "; or ".join(fixes) + f"{where}. No checkpoint was written for this step")


def allocator_metrics(device: torch.device) -> dict[str, float]:
    """CUDA: peak reserved memory and the allocator's retries (a retry frees cached blocks and tries again: a
    sign of fragmentation or a run at the edge of memory), since the last call; nothing elsewhere."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    out = {"memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
           "alloc_retries": float(stats.get("num_alloc_retries", 0)),
           "cuda_ooms": float(stats.get("num_ooms", 0))}
    return out


class Profiler:
    """A torch.profiler window over optimizer steps A..B: call ``before(step)`` and ``after(step)`` around each
    step (``step``: the step about to run / just done, 1-based). The profiler starts one step early where it
    can (a warm-up step whose events are dropped, as torch.profiler's schedule advises) and marks each traced
    step ``ProfilerStep#N``, the unit TensorBoard's profiler plugin shows."""

    def __init__(self, spec: str | None, run_dir: str, rank: int, enabled_here: bool, device: torch.device) -> None:
        self.window = parse_steps(spec) if spec and enabled_here else None
        self.rank, self.device = rank, device
        self.folder = Path(run_dir) / "profile"
        self.active = None
        self.path: Path | None = None

    def before(self, step: int) -> None:
        if self.window is None or self.active is not None or self.path is not None:
            return
        first, last = self.window
        if not first - 1 <= step <= last or (step == first - 1 and step < 1):
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        warmup = max(0, first - step)
        active = last - max(step, first) + 1
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.path = self.folder / f"rank{self.rank}.steps{first}-{last}.pt.trace.json"
        self.active = profile(activities=activities, schedule=schedule(wait=0, warmup=warmup, active=active),
                              on_trace_ready=self._write, record_shapes=True, profile_memory=True)
        self.active.start()

    def _write(self, prof) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))

    def after(self, step: int) -> Path | None:
        """The trace's path once the window closes at ``step``."""
        if self.active is None:
            return None
        self.active.step()  # the last active step's call writes the trace (on_trace_ready)
        if step < self.window[1]:
            return None
        self.active.stop()
        self.active = None
        return self.path

    def close(self) -> None:
        """A run that ends inside the window (preempted, stopped) writes what it has."""
        if self.active is not None:
            self.active.stop()
            self.active = None


class MemoryHistory:
    """``--memory-snapshot``: CUDA allocator history from the start; snapshots on OOM and after a chosen step."""

    def __init__(self, enabled: bool, at_step: int | None, run_dir: str, rank: int) -> None:
        self.enabled = enabled and torch.cuda.is_available()
        self.at_step, self.rank = at_step, rank
        self.folder = Path(run_dir)
        if self.enabled:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def dump(self, tag: str) -> Path | None:
        if not self.enabled:
            return None
        path = self.folder / f"memory_snapshot_{tag}.rank{self.rank}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def after(self, step: int) -> Path | None:
        return self.dump(f"step{step}") if self.enabled and step == self.at_step else None

    def close(self) -> None:
        if self.enabled:
            torch.cuda.memory._record_memory_history(enabled=None)


def profile_here(cfg, rank: int) -> bool:
    return bool(cfg.profile_steps) and (rank == 0 or not cfg.profile_rank0_only)

