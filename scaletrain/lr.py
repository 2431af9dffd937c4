"""Learning-rate schedules: linear warmup, then cosine, linear, constant or warmup-stable-decay (WSD).

WSD (MiniCPM, Hu et al. 2024; Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed
Training Durations") holds the peak after warmup and decays only over the last ``decay_steps`` of the run, so a
checkpoint of the stable phase can be continued with a longer run, or annealed: resume it with ``--max-steps S + D
--decay-steps D`` and the decay starts at once. Decay shapes as torchtitan names them: ``linear``, ``cosine`` and
``1-sqrt`` (the one Hägele et al. found best, ``1 - sqrt(progress)``).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "linear", "constant")
DECAY_SHAPES = ("linear", "cosine", "1-sqrt")


def decay_shape(shape: str, progress: float) -> float:
    """Fraction of the way from ``min_learning_rate`` to the peak at ``progress`` (0..1) through the decay."""
    if shape == "linear":
        return 1.0 - progress
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    raise ValueError(f"unknown decay shape {shape!r}; valid: {', '.join(DECAY_SHAPES)}")


def lr_at(step: int, *, learning_rate: float, min_learning_rate: float, warmup_steps: int, max_steps: int,
          schedule: str = "cosine", decay_steps: int | None = None, shape: str = "linear") -> float:
    """Learning rate for optimizer step ``step`` (0-based: the step about to be taken).

    Warmup reaches ``learning_rate`` at ``step == warmup_steps - 1``. Then: ``cosine`` (and ``linear``) decay from
    ``learning_rate`` at ``warmup_steps`` to ``min_learning_rate`` at ``max_steps``; ``constant`` stays at the
    peak; ``wsd`` stays at the peak until ``max_steps - decay_steps`` and decays in ``shape`` to
    ``min_learning_rate`` at ``max_steps``. Past ``max_steps`` the end value holds.
    """
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    if schedule == "constant":
        return learning_rate
    if schedule == "wsd":
        start = max(warmup_steps, max_steps - (decay_steps if decay_steps is not None else 0))
    elif schedule in ("cosine", "linear"):
        start, shape = warmup_steps, schedule
    else:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if step < start:
        return learning_rate
    progress = min(1.0, (step - start) / max(1, max_steps - start))
    return min_learning_rate + (learning_rate - min_learning_rate) * decay_shape(shape, progress)


def schedule_kwargs(cfg) -> dict:
    """``lr_at``'s keywords for a run's config."""
    return dict(learning_rate=cfg.learning_rate, min_learning_rate=cfg.min_learning_rate, warmup_steps=cfg.warmup,
                max_steps=cfg.max_steps, schedule=cfg.lr_schedule, decay_steps=cfg.decay_length,
                shape=cfg.decay_shape)


def describe(cfg) -> str:
    """The schedule in words, for the run's header."""
    warm = f"lr warms up to {cfg.learning_rate:g} over {cfg.warmup} step{'s' * (cfg.warmup != 1)}" + (
        "" if "warmup_steps" in cfg.explicit else
        " (the default: 1% of --max-steps, at least 1 and at most 2000; set --warmup-steps to choose)")
    if cfg.lr_schedule == "constant":
        return f"{warm}, then stays there (constant) to step {cfg.max_steps}"
    if cfg.lr_schedule == "wsd":
        start = max(cfg.warmup, cfg.max_steps - cfg.decay_length)
        return (f"{warm}, stays there to step {start}, then decays ({cfg.decay_shape}) to {cfg.min_learning_rate:g} "
                f"at step {cfg.max_steps} (wsd, {cfg.max_steps - start} decay steps)")
    return f"{warm}, then {cfg.lr_schedule} to {cfg.min_learning_rate:g} at step {cfg.max_steps}"


def lr_factor_fn(cfg) -> callable:
    """Multiplier of the peak LR per step, the form ``torch.optim.lr_scheduler.LambdaLR`` takes."""
    kwargs = schedule_kwargs(cfg)

    def factor(step: int) -> float:
        return lr_at(step, **kwargs) / cfg.learning_rate
    return factor


SCHEDULE_FIELDS = ("learning_rate", "min_learning_rate", "warmup_steps", "max_steps", "lr_schedule", "decay_fraction",
                   "decay_steps", "decay_shape")


def resume_jump(cfg, saved: dict, step: int) -> str | None:
    """What a resume's changed schedule does to the learning rate, when the next step's differs (by more than 1%)
    from what the checkpoint's run would have taken: extending a finished cosine run with a larger --max-steps
    climbs from its end value back towards the peak. ``saved``: the checkpoint's config."""
    theirs = {k: saved[k] for k in SCHEDULE_FIELDS if k in saved}
    if all(getattr(cfg, k) == v for k, v in theirs.items()):
        return None
    try:
        before = lr_at(step, **schedule_kwargs(cfg.replace(**theirs)))
    except Exception:  # a checkpoint's config that no longer validates: the per-flag warnings say what changed
        return None
    now = lr_at(step, **schedule_kwargs(cfg))
    if abs(now - before) <= 0.01 * max(abs(before), 1e-30):
        return None
    finished = step >= int(theirs.get("max_steps", step + 1))
    return (f"the learning-rate schedule changed: step {step + 1} takes lr {now:.4g} ({describe(cfg)}), where the "
            f"checkpoint's run " + (f"ended at {before:.4g}" if finished else f"would have taken {before:.4g}")
            + (f". A finished {saved.get('lr_schedule', 'cosine')} run extended by --max-steps climbs back towards the "
               f"peak; to go on from its end instead: --lr-schedule constant --learning-rate {before:.4g}"
               if finished and cfg.lr_schedule in ("cosine", "linear") else ""))
