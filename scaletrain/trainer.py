"""The training loop: data -> engine -> metrics -> checkpoints."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from scaletrain.checkpoint import (
    CheckpointManager,
    check_model_matches,
    checkpoint_meta,
    read_meta,
    resolve_resume,
    step_name,
)
from scaletrain.config import PreTrainingConfig
from scaletrain.data.loader import build_loader, model_vocab_size
from scaletrain.engine import Engine, get_engine_class
from scaletrain.metrics import MetricsLogger, Throughput, memory_gib, mfu, peak_tflops
from scaletrain.model import Llama, flops_per_token, get_model_config, num_params


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    last_loss: float | None
    skipped_steps: int
    preempted: bool = False


def build_model(cfg: PreTrainingConfig, vocab_size: int | None = None,
                device: torch.device | str = "cpu") -> Llama:
    """The preset (with ``--num-layers`` and the data's vocab applied), seeded identically on every rank.

    Built directly on ``device`` (initialising billions of weights on a GPU takes a blink, on a CPU minutes).
    """
    preset = get_model_config(cfg.model_config_name)
    model_cfg = get_model_config(cfg.model_config_name, n_layers=cfg.num_layers, vocab_size=vocab_size,
                                 max_seq_len=max(preset.max_seq_len, cfg.max_seq_length))
    torch.manual_seed(cfg.seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed(cfg.seed)
    with torch.device(device):
        return Llama(model_cfg)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _resolve_peak(cfg: PreTrainingConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if device.type == "cuda":
        return peak_tflops(torch.cuda.get_device_name(device), cfg.mixed_precision,
                           tf32=torch.backends.cuda.matmul.allow_tf32)
    return None  # CPU: MFU only with an explicit --peak-tflops


def evaluate(engine: Engine, cfg: PreTrainingConfig, val_loader_fn, env) -> float:
    """Mean loss over the held-out set: the same ``eval_steps`` micro-batches per rank every time."""
    loader = val_loader_fn()  # a fresh loader: the same held-out rows at every evaluation
    total = torch.zeros((), device=env.device)
    for _ in range(cfg.eval_steps):
        x, y = (t.to(env.device) for t in next(loader))
        total += engine.eval_loss(x, y)
    return engine.all_reduce_mean(total / cfg.eval_steps).item()


class _Preemption:
    """SIGTERM / SIGUSR1 (what schedulers send before they kill) -> save at the next step boundary."""

    def __init__(self, group) -> None:
        self.flag, self.group = False, group
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def requested(self) -> bool:
        """Whether any rank got the signal (a CPU collective on the control group, every step)."""
        t = torch.tensor([int(self.flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())


def train(cfg: PreTrainingConfig) -> TrainResult:
    engine_cls = get_engine_class(cfg.resolved_engine)
    env = engine_cls.init_distributed()
    control = dist.new_group(backend="gloo")  # small CPU collectives: preemption, checkpoint errors
    resume = resolve_resume(cfg.resume, cfg.checkpoint_dir)
    resume_meta = read_meta(resume) if resume else None
    # the data decides the vocab; a synthetic source uses the preset's
    probe = build_loader(cfg, env.rank, env.world_size, vocab_size=get_model_config(cfg.model_config_name).vocab_size)
    vocab = probe.vocab_size if cfg.data == "synthetic" else model_vocab_size(probe.vocab_size)
    model = build_model(cfg, vocab_size=vocab, device="cpu" if cfg.fsdp_cpu_offload else env.device)
    model_cfg = model.config
    if resume_meta:
        check_model_matches(resume_meta, model_cfg, resume)
    engine = engine_cls(model, cfg, env, resume_meta=resume_meta)  # may adopt batch settings from a ds_config
    loader = build_loader(cfg, env.rank, env.world_size, vocab_size=vocab)
    has_val = build_loader(cfg, env.rank, env.world_size, "val", vocab) is not None
    if cfg.eval_interval and not has_val and env.is_main:
        print("scaletrain: no validation split in the data (prepare with --val-fraction); no val_loss", flush=True)
    ckpt = CheckpointManager(cfg.checkpoint_dir, cfg.keep_last_n_checkpoints, env.rank, control)

    start_step, tokens_seen, best_val = 0, 0, float("inf")
    if resume:
        state = engine.load(str(resume))
        start_step, tokens_seen = state["step"], state["tokens_seen"]
        best_val = state.get("best_val", best_val)
        loader.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        if env.is_main:
            print(f"scaletrain: resumed from {resume} at step {start_step} (saved by {resume_meta['world_size']} "
                  f"ranks, now {env.world_size})", flush=True)

    def save(name: str, step: int, val: float = best_val, background: bool = False) -> None:
        client = {"step": step, "tokens_seen": tokens_seen, "config": cfg.to_dict(), "data": loader.state_dict(),
                  "rng": _rng_state(), "best_val": val}
        path = ckpt.save(engine, name, client, checkpoint_meta(step, tokens_seen, env.world_size, engine.name,
                                                               model_cfg, cfg), background=background)
        if env.is_main:
            print(f"scaletrain: {'writing' if background else 'saved'} {path}", flush=True)

    run_name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    logger = MetricsLogger(cfg, os.path.join(cfg.run_dir, run_name), env.is_main, cfg.to_dict(), start_step)
    fpt = flops_per_token(model_cfg, cfg.max_seq_length)
    peak = _resolve_peak(cfg, env.device)
    tokens_per_step = loader.global_batch * cfg.max_seq_length
    if env.is_main:
        print(f"scaletrain: engine {engine.name}, world {env.world_size}, device {env.device.type}, "
              f"model {cfg.model_config_name} ({num_params(model_cfg) / 1e6:,.2f}M params), "
              f"{cfg.mixed_precision}, global batch {loader.global_batch} x {cfg.max_seq_length} "
              f"tokens, steps {start_step}->{cfg.max_steps}", flush=True)

    preempt = _Preemption(control)
    meter = Throughput()
    last_loss, preempted = None, False
    non_blocking = env.device.type == "cuda"
    try:
        for step in range(start_step, cfg.max_steps):
            batches = [tuple(t.to(env.device, non_blocking=non_blocking) for t in next(loader))
                       for _ in range(cfg.gradient_accumulation_steps)]
            out = engine.train_step(batches)
            tokens_seen += tokens_per_step
            meter.add(tokens_per_step)
            logger.advance()
            done = step + 1
            metrics: dict[str, float] = {}
            if has_val and cfg.eval_interval and (done % cfg.eval_interval == 0 or done == cfg.max_steps):
                t_eval = time.perf_counter()
                metrics["val_loss"] = evaluate(
                    engine, cfg, lambda: build_loader(cfg, env.rank, env.world_size, "val", vocab), env)
                if metrics["val_loss"] < best_val and cfg.save_interval:
                    best_val = metrics["val_loss"]
                    save("best", done, best_val)
                meter.exclude(time.perf_counter() - t_eval)  # keep tokens/s a training figure
            if done % cfg.log_interval == 0 or done == cfg.max_steps:
                # the only host syncs of the loop (apart from the engine's finite check)
                loss = engine.all_reduce_mean(out.loss).item()
                last_loss = loss
                tok_s, step_time = meter.report()
                metrics.update({"loss": loss, "lr": out.lr, "grad_norm": float(out.grad_norm),
                                "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / env.world_size,
                                "step_time_s": step_time, "tokens_seen": tokens_seen,
                                "skipped_steps": engine.skipped_steps, "memory_gib": memory_gib(env.device)})
                if peak:
                    metrics["mfu"] = mfu(fpt, tok_s / env.world_size, peak)
            if metrics:
                logger.log(done, metrics)
            t_save = time.perf_counter()
            if preempt.requested():
                save(step_name(done), done)
                if env.is_main:
                    print(f"scaletrain: preempted at step {done}: checkpoint saved, exiting", flush=True)
                preempted = True
                break
            if done == cfg.stop_at_step and done != cfg.max_steps:
                save(step_name(done), done)
                if env.is_main:
                    print(f"scaletrain: stopped at step {done} (--stop-at-step); resume with --resume latest")
                break
            if cfg.save_interval and done % cfg.save_interval == 0 and done != cfg.max_steps:
                save(step_name(done), done, background=cfg.async_checkpoint)
            if cfg.save_interval and done == cfg.max_steps:
                save("final", done)
            meter.exclude(time.perf_counter() - t_save)
        ckpt.finish()  # commit a background save still in flight
    finally:
        logger.close()
    result = TrainResult(steps=cfg.max_steps, tokens_seen=tokens_seen, last_loss=last_loss,
                         skipped_steps=engine.skipped_steps, preempted=preempted)
    engine.close()
    return result
