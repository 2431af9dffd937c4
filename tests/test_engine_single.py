"""Engine behaviour in one process (a world of one): non-finite steps and save/load round trips."""

import pytest
import torch

from scaletrain.cli import parse_config
from scaletrain.data.synthetic import SyntheticLoader
from scaletrain.engine import TrainingDiverged, get_engine_class
from scaletrain.trainer import build_model

ARGS = ["--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2", "--gradient-accumulation-steps", "2",
        "--max-steps", "20", "--warmup-steps", "2", "--mixed-precision", "fp32", "--max-nonfinite-steps", "3"]
ENGINES = {"fsdp": ["--engine", "fsdp"], "zero2": ["--engine", "deepspeed"]}


@pytest.fixture(scope="module")
def env():
    # one process group for the module; both back ends join an existing one
    cls = get_engine_class("deepspeed")
    yield cls.init_distributed()


def make(env, kind, extra=()):
    cfg = parse_config(ARGS + ENGINES[kind] + list(extra))
    model = build_model(cfg)
    engine = get_engine_class(cfg.resolved_engine)(model, cfg, env)
    loader = SyntheticLoader(model.config.vocab_size, cfg.max_seq_length, cfg.micro_batch_size,
                             cfg.gradient_accumulation_steps, 0, 1, cfg.seed)
    return engine, loader, model


def batches(loader, n=2):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("kind", list(ENGINES))
def test_nonfinite_step_is_skipped_then_training_stops(env, kind):
    engine, loader, model = make(env, kind)
    poison = {"on": False}
    model.norm.register_forward_hook(lambda m, i, o: o * float("nan") if poison["on"] else o)
    assert not engine.train_step(batches(loader)).skipped
    before = [p.detach().clone() for p in engine.module.parameters()]
    poison["on"] = True
    out = engine.train_step(batches(loader))
    assert out.skipped and engine.skipped_steps == 1
    after = [p.detach() for p in engine.module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a skipped step changed the weights"
    poison["on"] = False
    assert not engine.train_step(batches(loader)).skipped and engine.nonfinite_in_a_row == 0
    poison["on"] = True
    engine.train_step(batches(loader))
    engine.train_step(batches(loader))
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row had a non-finite"):
        engine.train_step(batches(loader))


@pytest.mark.parametrize("kind", list(ENGINES))
def test_save_load_continues_bit_identically(env, kind, tmp_path):
    ref, ref_loader, _ = make(env, kind)
    straight = [ref.train_step(batches(ref_loader)).loss.item() for _ in range(4)]

    engine, loader, _ = make(env, kind)
    first = [engine.train_step(batches(loader)).loss.item() for _ in range(2)]
    engine.save(str(tmp_path), {"data": loader.state_dict()})
    engine2, loader2, _ = make(env, kind)
    state = engine2.load(str(tmp_path))
    loader2.load_state_dict(state["data"])
    assert engine2.steps_taken == 2
    resumed = [engine2.train_step(batches(loader2)).loss.item() for _ in range(2)]
    assert first + resumed == straight
    assert engine2.current_lr() == ref.current_lr()
