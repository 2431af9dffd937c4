"""Throughput, MFU and the loggers (console, metrics.jsonl, TensorBoard, W&B); rank 0 writes.

MFU = flops_per_token (model/flops.py) x tokens/s per device / the device's dense peak
for the run's precision. Peaks are the vendors' dense (no sparsity) tensor-core figures.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

# dense TFLOP/s: (bf16/fp16 tensor core, tf32 tensor core, fp32 non-tensor). Sources: NVIDIA
# datasheets (H100/H200: "H100 Tensor Core GPU" and "H200" datasheets, sparsity figures halved;
# A100 datasheet; L40S datasheet; B200: HGX B200 8-GPU figures / 8, sparsity halved).
PEAK_TFLOPS: list[tuple[str, tuple[float, float, float]]] = [
    ("H100 NVL", (835.0, 417.5, 60.0)),
    ("H100 PCIe", (756.0, 378.0, 51.0)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM5
    ("H200 NVL", (835.0, 417.5, 60.0)),
    ("H200", (989.4, 494.7, 66.9)),  # SXM5
    ("GH200", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.05, 183.0, 91.6)),
    ("B200", (2250.0, 1100.0, 75.0)),
]


def peak_tflops(device_name: str, precision: str, tf32: bool = True) -> float | None:
    """Dense peak TFLOP/s of a GPU by its name (``torch.cuda.get_device_name``), or None."""
    for key, (half, tf, fp32) in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            if precision in ("bf16", "fp16"):
                return half
            return tf if tf32 else fp32
    return None


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak_tflops_: float) -> float:
    """Model FLOPs utilisation as a fraction (0..1)."""
    return flops_per_token * tokens_per_s_per_device / (peak_tflops_ * 1e12)


def memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated (CUDA) or this process's resident set size (CPU), GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


class MetricsLogger:
    """Fans metrics out to the console, ``metrics.jsonl``, TensorBoard and W&B (rank 0 only)."""

    def __init__(self, cfg, run_dir: str, enabled: bool, config_dict: dict[str, Any], start_step: int = 0,
                 resumed: bool = False, rollback: bool = False) -> None:
        """``rollback``: the run resumed a checkpoint older than its newest one (a crash resumes its newest: the
        steps it logs again are the ones W&B has, by exact resume)."""
        self.enabled = enabled
        self.tb = self.wandb = self.bar = None
        self.jsonl = None
        self.samples_file = True  # samples.jsonl is opened at each evaluation; None once writing it failed
        if not enabled:
            return
        if sys.stdout.isatty():  # a progress bar with ETA on a terminal; plain lines in logs and pipes
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stdout)
        self.run_dir = Path(run_dir)
        jsonl = Path(run_dir) / "metrics.jsonl"
        try:  # before the first step, a run folder that cannot be written stops the run (nothing is lost yet)
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            if not resumed:
                aside = set_aside_earlier_logs(Path(run_dir))
                if aside is not None:
                    print(f"scaletrain: run '{cfg.run_name}' starts over: the logs of its earlier start "
                          f"(metrics.jsonl, TensorBoard events, W&B id, ...) moved to {aside}, so that the run's "
                          f"folder holds one course; nothing was deleted", flush=True)
            dropped = []
            for log in (jsonl, Path(run_dir) / "samples.jsonl"):
                _end_torn_line(log)
                if start_step:  # a resume logs the steps after its checkpoint again
                    dropped.append(_drop_steps_after(log, start_step))
            self.jsonl = open(jsonl, "a")
            (Path(run_dir) / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True))
        except OSError as e:
            from scaletrain.errors import ScaletrainError

            raise ScaletrainError(f"--run-dir {cfg.run_dir}: the run's folder {run_dir} cannot be written "
                                  f"({e.strerror or e}); free space there or give another --run-dir") from e
        if cfg.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # the same run's events continue; those of steps after the resumed checkpoint are purged
            self.tb = SummaryWriter(log_dir=run_dir, purge_step=start_step + 1 if start_step else None)
            _quiet_tensorboard_thread()
        if cfg.use_wandb:
            last = max((d for d in dropped if d is not None), default=None)
            self.wandb = _init_wandb(cfg, run_dir, config_dict,
                                     (start_step, last) if rollback and last is not None else None)

    def advance(self) -> None:
        """One optimizer step done (moves the progress bar; no host sync)."""
        if self.bar is not None:
            self.bar.update(1)

    def _lost(self, sink: str, what: str, e: OSError) -> None:
        """A file sink failed (a full disk or quota, a vanished mount): say so once, drop it, train on. The logs are
        not worth the run: training and checkpoints go on, and the console still shows every line."""
        handle = getattr(self, sink)
        setattr(self, sink, None)
        try:
            if hasattr(handle, "close"):
                handle.close()
        except Exception:  # noqa: BLE001 - closing flushes what could not be written: the same failure again
            pass
        print(f"scaletrain: warning: writing {what} in {self.run_dir} failed ({type(e).__name__}: {e}); it is not "
              f"written for the rest of this run, which goes on (free space there and resume to log again)",
              file=sys.stderr, flush=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            try:
                self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
                self.jsonl.flush()
            except OSError as e:
                self._lost("jsonl", "metrics.jsonl", e)
        if self.tb is not None:
            try:
                for k, v in metrics.items():
                    self.tb.add_scalar(k, v, step)
            except OSError as e:
                self._lost("tb", "TensorBoard events", e)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        parts = [f"step {step:>6d}"]
        formats = (("loss", "{:.4f}"), ("val_loss", "{:.4f}"), ("lr", "{:.3e}"), ("grad_norm", "{:.3f}"),
                   ("tokens_per_s", "{:,.0f}"), ("mfu", "{:.1%}"), ("step_time_s", "{:.3f}s"), ("data_wait", "{:.1%}"),
                   ("memory_gib", "{:.2f}GiB"))
        for k, fmt in formats:
            if k in metrics:
                parts.append(f"{k} " + fmt.format(metrics[k]))
            if k == "val_loss":  # then each domain's
                parts += [f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("val_loss/")]
        epochs = {k[7:]: v for k, v in metrics.items() if k.startswith("epochs/")}
        if epochs:
            parts.append("epochs " + " ".join(f"{d} {e:.2f}" for d, e in epochs.items()))
        line = " | ".join(parts)
        if self.bar is not None:
            self.bar.set_postfix(loss=metrics.get("loss"), refresh=False)
            self.bar.write(line)
        else:
            print(line, flush=True)

    def log_samples(self, step: int, samples: dict[str, list[tuple[str, str, str]]]) -> None:
        """Text samples ({domain: [(prompt, how, continuation)]}): the console, ``samples.jsonl``, TensorBoard's
        text plugin (``samples/<domain>``) and a W&B table."""
        if not self.enabled or not samples:
            return
        from scaletrain.samples import as_markdown

        lines = [f"sample {domain} ({how}): {prompt!r} -> {text!r}"
                 for domain, rows in samples.items() for prompt, how, text in rows]
        if self.samples_file:
            try:
                with open(self.run_dir / "samples.jsonl", "a") as f:
                    for domain, rows in samples.items():
                        for prompt, how, text in rows:
                            f.write(json.dumps({"step": step, "domain": domain, "prompt": prompt, "decoding": how,
                                                "text": text}) + "\n")
            except OSError as e:
                self._lost("samples_file", "samples.jsonl", e)
        if self.tb is not None:
            try:
                for domain, rows in samples.items():
                    self.tb.add_text(f"samples/{domain}", as_markdown(rows), step)
                self.tb.flush()
            except OSError as e:
                self._lost("tb", "TensorBoard events", e)
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "domain", "prompt", "decoding", "text"],
                                data=[[step, d, p, h, t] for d, rows in samples.items() for p, h, t in rows])
            self.wandb.log({"samples": table}, step=step)
        for line in lines:
            (self.bar.write if self.bar is not None else print)(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink, what in (("jsonl", "metrics.jsonl"), ("tb", "TensorBoard events")):
            if getattr(self, sink) is not None:
                try:
                    getattr(self, sink).flush()  # TensorBoard's close would drop its writer thread's failure unsaid
                    getattr(self, sink).close()
                except OSError as e:
                    self._lost(sink, what, e)
        if self.wandb is not None:
            self.wandb.finish()


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes its events from a thread that, when a write fails (a full disk), keeps the error to raise
    it at the next write or flush from the training thread, where ``MetricsLogger._lost`` reports it in one line,
    and also re-raises it, so that threading prints a traceback through TensorBoard's code on top. Leave that copy
    out; any other thread's exception is printed as before."""
    previous = threading.excepthook
    if getattr(previous, "scaletrain", False):
        return

    def hook(args) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError) and \
                getattr(args.thread, "exception", None) is args.exc_value:
            return
        previous(args)

    hook.scaletrain = True
    threading.excepthook = hook


def _end_torn_line(jsonl: Path) -> None:
    """A line cut short (a kill mid-write, a full disk) has no newline, and the next line appended would join it:
    both lost to every reader (``scaletrain plot``, pandas, jq). The torn line is cut off (its step is logged again
    after a resume), or ended with a newline when what is there is whole JSON."""
    try:
        size = jsonl.stat().st_size
    except FileNotFoundError:
        return
    if size == 0:
        return
    with open(jsonl, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        start = max(0, size - (1 << 20))
        f.seek(start)
        tail = f.read()
        cut = tail.rfind(b"\n") + 1
        try:
            json.loads(tail[cut:])
            whole = True
        except ValueError:
            whole = cut == 0 and start > 0  # a line over 1 MiB: not ours to judge, only to end
        if whole:
            f.seek(size)
            f.write(b"\n")
        else:
            f.truncate(start + cut)


# what a start of a run writes into its folder: logs, TensorBoard events, the W&B id and offline runs, profiler
# traces, memory snapshots (the checkpoint folder, which may be this folder too, is never among them)
RUN_LOGS = ("metrics.jsonl", "samples.jsonl", "config.json", "wandb_id", "wandb", "profile", "events.out.tfevents.*",
            "memory_snapshot_*.pickle")


def set_aside_earlier_logs(run_folder: Path) -> Path | None:
    """A run that starts over under its name (its checkpoints deleted by ``--overwrite-checkpoints``, or a crash
    before its first save) finds the logs of its earlier start in its folder. Appended to, they read as one course
    whose steps go back (2, 4, 2, 4: plots and TensorBoard draw both as one line, and W&B, continuing the same run
    id, drops every step it has seen). They (``RUN_LOGS``) are moved, never deleted, into ``superseded-<time>/`` in
    the folder. Returns that folder, or None when there was nothing of an earlier start."""
    def logged(name: str) -> bool:  # a file of lines with some in it (an empty one, or /dev/full, holds no course)
        p = run_folder / name
        return p.is_file() and p.stat().st_size > 0

    if not (logged("metrics.jsonl") or logged("samples.jsonl") or (run_folder / "wandb_id").exists()
            or any(run_folder.glob("events.out.tfevents.*"))):
        return None
    moved = sorted({p for pattern in RUN_LOGS for p in run_folder.glob(pattern)})
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = run_folder / f"superseded-{stamp}", 1
    while aside.exists():  # two starts in one second
        n += 1
        aside = run_folder / f"superseded-{stamp}-{n}"
    aside.mkdir()
    for p in moved:
        p.rename(aside / p.name)
    return aside


def _drop_steps_after(jsonl: Path, step: int) -> int | None:
    """Keep the lines of ``metrics.jsonl`` up to ``step`` (a resumed run logs the later steps again); returns the
    last step dropped, or None."""
    if not jsonl.exists():
        return None
    lines = jsonl.read_text().splitlines(keepends=True)
    kept, dropped = [], None
    for line in lines:
        try:
            logged = int(json.loads(line)["step"])
            if logged > step:
                dropped = logged if dropped is None else max(dropped, logged)
                continue
        except (ValueError, KeyError, TypeError):
            pass  # another writer's line: kept as it was
        kept.append(line)
    if len(kept) != len(lines):
        tmp = jsonl.with_name(jsonl.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, jsonl)
    return dropped


def wandb_run_id(run_dir: str, new: bool = False) -> str:
    """The W&B run id of this run folder: made once, kept in ``run_dir/wandb_id``, so every start of the run (a
    resume, a requeued job) continues the same W&B run; ``new``: a fresh one replaces it."""
    path = Path(run_dir) / "wandb_id"
    if path.exists() and not new:
        return path.read_text().strip()
    import secrets

    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


def _init_wandb(cfg, run_dir: str, config_dict: dict[str, Any], rewound: tuple[int, int] | None = None):
    """W&B run, or None with a warning: a logging service must never stop training. Every start of a run goes to W&B
    group ``run_name``. ``rewound`` (resumed step, last step logged): a rollback, the resume of an older checkpoint
    than the run's newest, from before steps W&B has already recorded. W&B keeps a run's steps increasing and
    ignores steps logged below its last one (rewinding a run is a preview feature of its server), so the steps after
    the checkpoint would be dropped up to the last logged one, and its charts keep the abandoned course. This course
    logs to a new W&B run of the same group instead, and the earlier run keeps the abandoned steps."""
    mode = os.environ.get("WANDB_MODE")
    if mode is None and not os.environ.get("WANDB_API_KEY"):
        warnings.warn(f"--use-wandb without WANDB_API_KEY: logging offline to {os.path.join(run_dir, 'wandb')} "
                      f"(upload later with `wandb sync {os.path.join(run_dir, 'wandb')}`)", stacklevel=2)
        mode = "offline"
    try:
        import wandb

        id_file = Path(run_dir) / "wandb_id"
        earlier = id_file.read_text().strip() if rewound is not None and id_file.exists() else None
        run_id = wandb_run_id(run_dir, new=earlier is not None)
        if earlier is not None:
            config_dict = {**config_dict, "rewound_from": {"wandb_run": earlier, "step": rewound[0],
                                                           "last_logged_step": rewound[1]}}
            print(f"scaletrain: resumed at step {rewound[0]}, before step {rewound[1]} that W&B run {earlier} has "
                  f"already recorded (W&B ignores steps logged out of order): this course logs to a new W&B run "
                  f"{run_id} in group {cfg.run_name!r}; {earlier} keeps the abandoned steps", flush=True)
        return wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name or cfg.run_name, group=cfg.run_name,
                          id=run_id, resume="allow", config=config_dict, dir=run_dir, mode=mode,
                          settings=wandb.Settings(init_timeout=60, silent=True))
    except Exception as e:  # network down, bad key, ...
        print(f"warning: Weights & Biases disabled: {e}", file=sys.stderr, flush=True)
        return None


class Throughput:
    """Tokens/s over the window since the last report (call ``report`` after a host sync), and the share of that
    window the loop spent waiting for its loader."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.steps = 0
        self.wait = 0.0

    def waited(self, seconds: float) -> None:
        """``seconds`` of the current window went into fetching batches (``next(loader)``)."""
        self.wait += seconds

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.steps += 1

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (evaluation, checkpointing) out of the current window."""
        self.t0 += seconds

    def report(self) -> tuple[float, float, float]:
        """(tokens/s, seconds per step, fraction of the window spent waiting for data), then a new window."""
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        out = (self.tokens / dt, dt / max(self.steps, 1), min(1.0, self.wait / dt))
        self.t0, self.tokens, self.steps, self.wait = now, 0, 0, 0.0
        return out
