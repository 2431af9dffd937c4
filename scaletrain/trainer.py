"""The training loop: data -> engine -> metrics -> checkpoints.

The run is resolved once (``run.plan_run``), then built: model, engine, loaders (train and
validation, each once), the train state and the checkpoint manager, which decides every save
in one call per step.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from scaletrain.checkpoint import CheckpointManager
from scaletrain.checkpoint.manager import checkpoint_bytes
from scaletrain.checkpoint.recovery import write_speed
from scaletrain.config import PreTrainingConfig, parse_duration
from scaletrain.data.loader import build_loader
from scaletrain.engine import Engine, get_engine_class
from scaletrain.engine.base import fill_whole, unfilled_model
from scaletrain.errors import ScaletrainError
from scaletrain.faults import crash, crash_step, poisoned_step
from scaletrain.lr import describe as describe_schedule
from scaletrain.metrics import MetricsLogger, Throughput, memory_gib, mfu, peak_tflops
from scaletrain.model import Llama, ModelConfig, flops_per_token, num_params
from scaletrain.model.weights import RandomWeights, ResumedWeights
from scaletrain.observe import (
    MemoryHistory,
    OutOfMemory,
    Profiler,
    allocator_metrics,
    is_oom,
    oom_message,
    profile_here,
)
from scaletrain.run import RunPlan, model_config_for, plan_run
from scaletrain.spikes import SpikeGuard
from scaletrain.stop import INTERRUPT, TIME, Deadline, StopSignals
from scaletrain.train_state import TrainState
from scaletrain.watchdog import exit_with_launcher


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    last_loss: float | None
    skipped_steps: int
    preempted: bool = False
    interrupted: bool = False  # the stop was a Ctrl-C (SIGINT): the entry point exits 130
    checkpoint: str | None = None  # the last checkpoint written


def build_model(cfg: PreTrainingConfig | ModelConfig, vocab_size: int | None = None,
                device: torch.device | str = "cpu", seed: int | None = None) -> Llama:
    """A whole model for a run's config (or a model config) with the run's random initialisation (the same
    weights an engine's sharded build gives for this seed). For tests and benchmarks; runs build through
    ``Engine.build_model``."""
    model_cfg = cfg if isinstance(cfg, ModelConfig) else model_config_for(cfg, vocab_size)
    seed = seed if seed is not None else getattr(cfg, "seed", 0)
    model = unfilled_model(model_cfg, device)
    fill_whole(model, RandomWeights(seed))
    return model


def _say_validation(val_loader, cfg: PreTrainingConfig) -> None:
    """Which domains the validation loss covers, when not all (a domain prepared without --val-fraction)."""
    missing = [s for s, w in zip(cfg.data_sources, cfg.data_mix_weights) if w > 0 and s not in val_loader] \
        if isinstance(val_loader, dict) else []
    if val_loader is None:
        print("scaletrain: no validation split in the data (prepare with --val-fraction); no val_loss", flush=True)
    elif missing:
        print(f"scaletrain: validation: {', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no validation "
              f"split (prepare with --val-fraction); val_loss is the mix of {', '.join(val_loader)} only", flush=True)


def _say_repeats(val_loader, cfg: PreTrainingConfig) -> None:
    """After the first validation pass: a held-out split smaller than a pass repeats its rows in every pass (the
    figure is still the same each time, but over fewer documents than the flags suggest)."""
    if not isinstance(val_loader, dict):
        return
    over = {d: e for d, loader in val_loader.items() if (e := loader.epochs()[d]) > 1}
    if over:
        rows = next(iter(val_loader.values())).global_batch
        print(f"scaletrain: validation: the held-out split of {', '.join(over)} is smaller than a pass (--eval-steps "
              f"{cfg.eval_steps} global batches of {rows} rows, shared by the domains), so a pass reads it "
              f"{max(over.values()):.1f} times; lower --eval-steps, or prepare with a larger --val-fraction",
              flush=True)


def _resolve_peak(cfg: PreTrainingConfig, device: torch.device) -> float | None:
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if device.type == "cuda":
        return peak_tflops(torch.cuda.get_device_name(device), cfg.mixed_precision,
                           tf32=torch.backends.cuda.matmul.allow_tf32)
    return None  # CPU: MFU only with an explicit --peak-tflops


def evaluate(engine: Engine, val_loaders, eval_steps: int, device: torch.device,
             weights: dict[str, float] | None = None, micro_steps: int = 1) -> dict[str, float]:
    """``val_loss`` and, for prepared data, ``val_loss/<domain>`` for each domain: loss per target token over the
    same held-out rows every time: ``eval_steps`` global batches in all, shared by the domains, each read as
    ``micro_steps`` (the accumulation) micro-batches per rank, so the rows are the same on any number of ranks as
    long as the global batch is (``eval_steps`` micro-batches per rank read twice the rows on twice the ranks: a run
    resumed on another world size compared its validation loss, and its ``best``, against other rows). The mixed
    ``val_loss`` is the domains' losses weighted by the mix (the weights are token shares, so this is the
    expectation the mixed training stream has)."""
    if not isinstance(val_loaders, dict):  # synthetic data: one stream
        return {"val_loss": _loss(engine, val_loaders, eval_steps * micro_steps, device)}
    steps = max(1, round(eval_steps / len(val_loaders)))
    out = {f"val_loss/{d}": _loss(engine, loader, steps * micro_steps, device) for d, loader in val_loaders.items()}
    w = {d: (weights or {}).get(d, 1.0) for d in val_loaders}
    out["val_loss"] = sum(w[d] * out[f"val_loss/{d}"] for d in w) / sum(w.values())
    return out


def _loss(engine: Engine, val_loader, micro_batches: int, device: torch.device) -> float:
    val_loader.rewind()
    total = torch.zeros(2, device=device)  # (sum of token losses, target tokens)
    for _ in range(micro_batches):
        x, y = (t.to(device) for t in next(val_loader)[:2])
        loss_sum, n = engine.eval_loss(x, y)
        total += torch.stack([loss_sum, n])
    total = engine.all_reduce_sum(total)
    return (total[0] / total[1]).item()


class _EpochLimit:
    """A domain read past ``--max-epochs-per-domain`` repeats its documents: warn once per domain, or stop."""

    def __init__(self, limit: float, action: str, is_main: bool) -> None:
        self.limit, self.action, self.is_main = limit, action, is_main
        self.warned: set[str] = set()
        self.reason = ""

    def check(self, epochs: dict[str, float], step: int) -> str | None:
        over = {d: e for d, e in epochs.items() if e > self.limit and d not in self.warned}
        if not over:
            return None
        self.warned |= set(over)
        self.reason = ", ".join(f"{d} at {e:.2f} epochs" for d, e in over.items())
        if self.is_main:
            print(f"scaletrain: step {step}: {self.reason}, past --max-epochs-per-domain {self.limit:g}: its documents "
                  f"repeat" + ("" if self.action == "stop" else " (--epoch-limit stop stops the run here; add data "
                                                                 "or lower its weight)"), flush=True)
        return "epoch_limit" if self.action == "stop" else None


def _fetch(loader, n: int) -> tuple[list, BaseException | None]:
    """The next step's ``n`` micro-batches, or those read before the data failed and why: a shard damaged or
    prepared again since the run started, a read error of the disk (EIO, a stale NFS handle)."""
    fetched: list = []
    try:
        for _ in range(n):
            fetched.append(next(loader))
    except (ScaletrainError, OSError) as e:
        return fetched, e
    return fetched, None


def _data_stop(error: BaseException | None, saved, step: int) -> ScaletrainError:
    """The error a data failure ends the run with, once the checkpoint of the last step is written."""
    after = (f"; checkpoint {saved} holds step {step}: once the data is whole again, resume with --resume latest "
             f"(a domain prepared again also needs --allow-data-change)")
    if error is None:
        return ScaletrainError(f"another rank's data failed before step {step + 1} (its message says why){after}")
    what = str(error).splitlines()[0] if isinstance(error, ScaletrainError) else f"reading the data failed ({error})"
    return ScaletrainError(what + after)


def _header(plan: RunPlan, engine: Engine, env, start_step: int, global_batch: int) -> str:
    cfg, mc = plan.cfg, plan.model_config
    model = cfg.model_config or ("from --init-from" if cfg.init_from else cfg.model_size)
    start = ("weights from " + plan.init_source.description if plan.init_source is not None and not plan.resume
             else None)
    if cfg.data_kind == "synthetic":
        data = "synthetic tokens"
    else:
        mix = ", ".join(f"{s} {w:g}" for s, w in zip(cfg.data_sources, cfg.data_mix_weights))
        tok = plan.tokenizer
        rows = "packed" if cfg.packing else "padded"
        if cfg.document_masking:
            rows += f" rows, attention within documents (EOS {tok.eos_id}" + (
                ", positions restart per document)" if cfg.restart_positions else ")")
        else:
            rows += " rows"
        data = f"{cfg.data_dir} ({mix}; {rows}; tokenizer {tok.name}, vocab {tok.vocab_size})"
    return (f"scaletrain: engine {engine.name}, world {env.world_size}, device {env.device.type}, model "
            f"{model} ({num_params(mc) / 1e6:,.2f}M params), {cfg.mixed_precision}, global batch "
            f"{global_batch} x {cfg.max_seq_length} tokens (micro-batch {cfg.micro_batch_size} x accumulation "
            f"{cfg.gradient_accumulation_steps} x world {env.world_size}), steps {start_step}->{cfg.max_steps}"
            + (f" (--max-tokens {cfg.max_tokens:,})" if cfg.max_tokens is not None else "") + "\n"
            + (f"scaletrain: {start}\n" if start else "") +
            f"scaletrain: data {data}\n"
            f"scaletrain: schedule: {describe_schedule(cfg)}\n"
            f"scaletrain: checkpoints -> {cfg.checkpoint_dir}, logs -> {os.path.join(cfg.run_dir, cfg.run_name)}; "
            + (f"step_N every {cfg.save_interval} steps" + (f" (the last {cfg.keep_last_n_checkpoints} kept)"
                                                             if cfg.keep_last_n_checkpoints else "")
               if cfg.save_interval else "no step_N checkpoints (--save-interval 0): a crash loses the run to its "
                                         "last best or final"))


def train(cfg: PreTrainingConfig) -> TrainResult:
    exit_with_launcher()  # a worker of torchrun/deepspeed must not outlive its launcher
    engine_cls = get_engine_class(cfg.resolved_engine)
    env = engine_cls.init_distributed()
    control = dist.new_group(backend="gloo")  # small CPU collectives: preemption, checkpoint errors
    plan = plan_run(cfg, engine_cls, env, control)
    try:
        return _train(plan, engine_cls, env, control)
    finally:
        plan.release()  # the checkpoint folder's lock


def _train(plan: RunPlan, engine_cls, env, control) -> TrainResult:
    cfg, model_cfg = plan.cfg, plan.model_config
    for line in plan.recovered:
        print(f"scaletrain: checkpoint recovery in {cfg.checkpoint_dir}: {line}", flush=True)
    model = engine_cls.build_model(model_cfg, cfg, env)
    if cfg.document_masking:
        model.set_document_masking(plan.tokenizer.eos_id, cfg.restart_positions, flex=env.device.type == "cuda")
    # --init-from is only where a run starts; a resumed run's weights come from its checkpoint, loaded below
    weights = (ResumedWeights() if plan.resume else
               plan.init_source if plan.init_source is not None else RandomWeights(cfg.seed))
    engine = engine_cls(model, cfg, env, resume_meta=plan.resume_meta, weights=weights)
    loader = build_loader(cfg, env.rank, env.world_size, vocab_size=model_cfg.vocab_size)
    val_loader = build_loader(cfg, env.rank, env.world_size, "val", model_cfg.vocab_size) if cfg.eval_interval \
        else None
    if cfg.eval_interval and env.is_main:
        _say_validation(val_loader, cfg)
    state = TrainState(spikes=SpikeGuard(cfg.spike_sigma, cfg.spike_window) if cfg.spike_sigma else None)
    engine.spike_guard = state.spikes
    poison_at = poisoned_step(env.rank)  # SCALETRAIN_FAULT=spike:STEP[@RANK], for the tests
    if poison_at is not None:
        model.norm.register_forward_hook(lambda m, i, o: o * 30 if state.step + 1 == poison_at else o)
    ckpt = CheckpointManager(cfg, env, engine, loader, state, model_cfg, plan.tokenizer, plan.tokenizer_file,
                             control, generation_config=plan.generation_config)
    if plan.resume:
        ckpt.load(plan.resume)
        if env.is_main:
            ranks = int(plan.resume_meta["world_size"])
            print(f"scaletrain: resumed from {plan.resume} at step {state.step} (saved by {ranks} "
                  f"rank{'s' if ranks != 1 else ''}, now {env.world_size})", flush=True)
            if state.step >= cfg.max_steps:
                print(f"scaletrain: the run is complete at --max-steps {cfg.max_steps}: nothing to train (give a "
                      f"larger --max-steps to go on)", flush=True)
    logger = MetricsLogger(cfg, os.path.join(cfg.run_dir, cfg.run_name), env.is_main, cfg.to_dict(), state.step,
                           resumed=bool(plan.resume), rollback=ckpt.rolled_back)
    fpt = flops_per_token(model_cfg, cfg.max_seq_length)
    peak = _resolve_peak(cfg, env.device)
    estimate = engine.memory_estimate(model_cfg)
    if env.is_main:
        print(_header(plan, engine, env, state.step, loader.global_batch), flush=True)
        print("scaletrain: " + estimate.table(cfg.micro_batch_size).replace("\n", "\nscaletrain: "), flush=True)
    run_folder = os.path.join(cfg.run_dir, cfg.run_name)
    profiler = Profiler(cfg.profile_steps, run_folder, env.rank, profile_here(cfg, env.rank), env.device)
    history = MemoryHistory(cfg.memory_snapshot, cfg.memory_snapshot_step, run_folder, env.rank)
    sampler = None
    if cfg.sample_tokens and val_loader is not None and plan.tokenizer is not None:
        from scaletrain.samples import Sampler

        sampler = Sampler(cfg, plan.tokenizer, plan.tokenizer_file, env.device)

    if state.step == cfg.max_steps == 0:  # --max-steps 0: the initial weights are the run's result
        ckpt.save("final")
    def evaluates(step: int) -> bool:  # validation runs after this step
        return val_loader is not None and (step % cfg.eval_interval == 0 or step == cfg.max_steps)

    deadline = Deadline(None if cfg.max_time is None else parse_duration(cfg.max_time))
    if deadline.limit_s is not None and not ckpt.longest_save_s:  # no save measured yet: a write probe stands in
        said = deadline.estimate_first_save(engine.checkpoint_share(checkpoint_bytes(model_cfg)),
                                            write_speed(cfg.checkpoint_dir, env.rank))
        if said and env.is_main:
            print(f"scaletrain: {said}", flush=True)
    signals = StopSignals(control, env.is_main, deadline)
    crash_at = crash_step(env.rank)  # SCALETRAIN_FAULT=crash:STEP[@RANK], for the tests
    epoch_limit = _EpochLimit(cfg.max_epochs_per_domain, cfg.epoch_limit, env.is_main)
    said_repeats = False  # the first validation pass says whether a held-out split repeats in a pass
    said_cut = False  # the first log says what --no-packing cut off long documents
    meter = Throughput()
    last_loss, stop = None, None
    non_blocking = env.device.type == "cuda"
    try:
        while state.step < cfg.max_steps:
            if state.step + 1 == crash_at:
                crash()
            profiler.before(state.step + 1)
            t_data = time.perf_counter()
            fetched, data_error = _fetch(loader, cfg.gradient_accumulation_steps)
            meter.waited(time.perf_counter() - t_data)  # the loader's share of the step (data_wait)
            stop_flag, data_failed = signals.requested(data_error is not None)
            if stop_flag or data_failed:  # the step is not taken: its rows are read again after the resume
                loader.unread(len(fetched))
                stop = "data_error" if data_failed else \
                    {INTERRUPT: "interrupted", TIME: "time_limit"}.get(stop_flag, "preempted")
                where = ckpt.stop_here(stop)
                if data_failed:
                    raise _data_stop(data_error, where, state.step) from data_error
                break
            batches = [(x.to(env.device, non_blocking=non_blocking), y.to(env.device, non_blocking=non_blocking), n)
                       for x, y, n in fetched]
            try:
                out = engine.train_step(batches)
            except Exception as e:
                if not is_oom(e):
                    raise
                raise OutOfMemory(oom_message(e, cfg, state.step, estimate, history.dump("oom"))) from e
            state.record_step(out.skipped, out.num_tokens, out.lr, cfg.max_nonfinite_steps, out.spike,
                              cfg.max_spike_steps)
            if out.spike and env.is_main:
                print(f"scaletrain: step {state.step} skipped: {out.spike}", flush=True)
            meter.add(out.num_tokens)  # real target tokens: padding is not throughput
            logger.advance()
            done = state.step
            for what, path in (("profiler trace", profiler.after(done)), ("memory snapshot", history.after(done))):
                if path is not None:
                    print(f"scaletrain: step {done}: {what} {path}", flush=True)
            metrics: dict[str, float] = {}
            val_loss = None
            if evaluates(done):
                t_eval = time.perf_counter()
                metrics.update(evaluate(engine, val_loader, cfg.eval_steps, env.device,
                                        dict(zip(cfg.data_sources, cfg.data_mix_weights)),
                                        cfg.gradient_accumulation_steps))
                val_loss = metrics["val_loss"]
                if not said_repeats and env.is_main:
                    _say_repeats(val_loader, cfg)
                said_repeats = True
                if sampler is not None:
                    logger.log_samples(done, sampler.sample(engine.module, done))
                meter.exclude(time.perf_counter() - t_eval)  # keep tokens/s a training figure
            epochs = loader.epochs() if hasattr(loader, "epochs") else {}
            limit = epoch_limit.check(epochs, done)
            if done % cfg.log_interval == 0 or done == cfg.max_steps:
                if not said_cut and env.is_main and hasattr(loader, "cut_warning") and (cut := loader.cut_warning()):
                    print(f"scaletrain: warning: {cut}", file=sys.stderr, flush=True)
                said_cut = True
                # the only host syncs of the loop (apart from the engine's finite check)
                last_loss = engine.step_loss(out)
                tok_s, step_time, data_wait = meter.report()
                metrics.update({"loss": last_loss, "lr": out.lr, "grad_norm": float(out.grad_norm),
                                "tokens_per_s": tok_s, "tokens_per_s_per_device": tok_s / env.world_size,
                                "step_time_s": step_time, "data_wait": data_wait, "tokens_seen": state.tokens_seen,
                                "skipped_steps": state.skipped_steps, "memory_gib": memory_gib(env.device),
                                **allocator_metrics(env.device)})
                if state.spikes is not None:
                    metrics["spike_steps"] = state.spike_steps
                if out.z_loss_sum is not None:
                    metrics["z_loss"] = (engine.all_reduce_sum(out.z_loss_sum) / out.num_tokens).item()
                if peak:
                    metrics["mfu"] = mfu(fpt, tok_s / env.world_size, peak)
                metrics.update({f"epochs/{d}": e for d, e in epochs.items()})
            if metrics:
                logger.log(done, metrics)
            t_save = time.perf_counter()
            stop = ckpt.after_step(val_loss, stop_for=limit)
            meter.exclude(time.perf_counter() - t_save)
            deadline.step_done(time.perf_counter() - t_save, ckpt.longest_save_s,
                               ckpt.saves_at(done + 1, evaluates(done + 1)))
            if stop:
                break
        ckpt.finish()  # commit a background save still in flight
    finally:
        signals.close()
        profiler.close()
        history.close()
        logger.close()
    if env.is_main:
        where = ckpt.last_saved or plan.resume  # resumed at --max-steps already: nothing new was written
        if stop == "preempted":
            print(f"scaletrain: preempted at step {state.step}: checkpoint {where} saved, exiting", flush=True)
        elif stop == "interrupted":
            print(f"scaletrain: interrupted (Ctrl-C) at step {state.step}: checkpoint {where} saved; resume with "
                  f"--resume latest", flush=True)
        elif stop == "epoch_limit":
            print(f"scaletrain: stopped at step {state.step} (--epoch-limit stop): {epoch_limit.reason}; checkpoint "
                  f"{ckpt.last_saved}. Raise --max-epochs-per-domain to go on, or add data", flush=True)
        elif stop == "time_limit":
            print(f"scaletrain: stopped at step {state.step} (--max-time {cfg.max_time}: {deadline.describe()}); "
                  f"checkpoint {where} saved; resume with --resume latest", flush=True)
        elif stop == "stop_at_step":
            print(f"scaletrain: stopped at step {state.step} (--stop-at-step); resume with --resume latest",
                  flush=True)
        else:
            print(f"scaletrain: done, {state.step} steps, {state.tokens_seen:,} tokens; final checkpoint {where}\n"
                  f"scaletrain: for Hugging Face transformers: python launch/convert.py {where} "
                  f"exports/{cfg.run_name}", flush=True)
    result = TrainResult(steps=state.step, tokens_seen=state.tokens_seen, last_loss=last_loss,
                         skipped_steps=state.skipped_steps, preempted=stop in ("preempted", "interrupted"),
                         interrupted=stop == "interrupted",
                         checkpoint=str(ckpt.last_saved) if ckpt.last_saved else None)
    engine.close()
    return result
