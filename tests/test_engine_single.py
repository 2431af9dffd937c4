"""Engine behaviour in one process (a world of one): non-finite steps, save/load round trips, and the
optimizer's invariants after any load."""

import pytest
import torch

from scaletrain.cli import parse_config
from scaletrain.data.synthetic import SyntheticLoader
from scaletrain.engine import get_engine_class
from scaletrain.engine.base import param_groups, restore_optimizer_invariants
from scaletrain.train_state import TrainingDiverged, TrainState
from scaletrain.trainer import build_model

ARGS = ["--model-size", "tiny", "--max-seq-length", "32", "--batch-size", "2", "--gradient-accumulation-steps", "2",
        "--max-steps", "20", "--warmup-steps", "2", "--mixed-precision", "fp32", "--max-nonfinite-steps", "3"]
ENGINES = {"fsdp": ["--engine", "fsdp"], "zero2": ["--engine", "deepspeed"],
           "zero3": ["--ds_config", "ds_configs/zero3_bf16.json", "--mixed-precision", "fp32"]}


@pytest.fixture(scope="module")
def env():
    # one process group for the module; both back ends join an existing one
    cls = get_engine_class("deepspeed")
    yield cls.init_distributed()


def make(env, kind, extra=()):
    from .conftest import ROOT

    argv = [a.replace("ds_configs/", str(ROOT / "ds_configs") + "/") for a in ARGS + ENGINES[kind] + list(extra)]
    if kind == "zero3":  # the shipped file enables bf16; fp32 here
        import json

        ds = json.loads((ROOT / "ds_configs" / "zero3_bf16.json").read_text())
        ds["bf16"] = {"enabled": "auto"}
        ds["sub_group_size"] = 20000  # several sub-groups, as a real model has
        ds["zero_optimization"]["sub_group_size"] = 20000
        import tempfile
        from pathlib import Path

        path = Path(tempfile.mkdtemp()) / "zero3_fp32.json"
        path.write_text(json.dumps(ds))
        argv[argv.index("--ds_config") + 1] = str(path)
    cfg = parse_config(argv)
    cls = get_engine_class(cfg.resolved_engine)
    cfg = cls.resolve_config(cfg, env.world_size, env.device.type).freeze()
    model = build_model(cfg)
    engine = cls(model, cfg, env)
    loader = SyntheticLoader(model.config.vocab_size, cfg.max_seq_length, cfg.micro_batch_size,
                             cfg.gradient_accumulation_steps, 0, 1, cfg.seed)
    return engine, loader, model


def batches(loader, n=2):
    return [next(loader) for _ in range(n)]


@pytest.mark.parametrize("kind", ["fsdp", "zero2"])
def test_nonfinite_step_is_skipped_then_training_stops(env, kind):
    engine, loader, model = make(env, kind)
    state = TrainState()

    def step():
        out = engine.train_step(batches(loader))
        state.record_step(out.skipped, out.num_tokens, out.lr, engine.cfg.max_nonfinite_steps)
        return out

    poison = {"on": False}
    model.norm.register_forward_hook(lambda m, i, o: o * float("nan") if poison["on"] else o)
    assert not step().skipped
    before = [p.detach().clone() for p in engine.module.parameters()]
    poison["on"] = True
    out = step()
    assert out.skipped and state.skipped_steps == 1 and state.optimizer_steps == 1
    after = [p.detach() for p in engine.module.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a skipped step changed the weights"
    poison["on"] = False
    assert not step().skipped and state.nonfinite_in_a_row == 0
    poison["on"] = True
    step()
    step()
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row had a non-finite"):
        step()


@pytest.mark.parametrize("kind", ["fsdp", "zero2", "zero3"])
def test_a_spike_step_is_skipped_leaving_weights_moments_and_schedule(env, kind):
    """--spike-sigma: after 20 steps of history, a poisoned step (its logits scaled 30x: a loss and gradient norm far
    above the window) is not taken: weights, Adam moments and step counts, and the learning rate stay; the next
    normal step is taken; --max-spike-steps poisoned steps in a row stop the run."""
    engine, loader, model = make(env, kind, ["--spike-sigma", "6", "--max-spike-steps", "3"])
    from scaletrain.spikes import SpikeGuard

    state = TrainState(spikes=SpikeGuard(6, 128))
    engine.spike_guard = state.spikes

    def step():
        out = engine.train_step(batches(loader))
        state.record_step(out.skipped, out.num_tokens, out.lr, engine.cfg.max_nonfinite_steps, out.spike,
                          engine.cfg.max_spike_steps)
        return out

    poison = {"on": False}
    model.norm.register_forward_hook(lambda m, i, o: o * 30 if poison["on"] else o)
    for _ in range(20):
        assert step().spike is None
    opt = engine.base_optimizer
    before = [p.detach().clone() for p in engine.module.parameters()]
    moments = [t.clone() for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"], s["step"])]
    lr = engine.current_lr()
    poison["on"] = True
    out = step()
    assert out.spike is not None and not out.skipped, out
    assert out.spike.startswith("loss ") and "standard deviations above the mean" in out.spike
    assert state.spike_steps == 1 and state.skipped_steps == 1 and state.optimizer_steps == 20
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters())), "a spike changed the weights"
    assert all(torch.equal(a, b) for a, b in
               zip(moments, [t for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"], s["step"])]))
    assert engine.current_lr() == lr and len(state.spikes.losses) == 20  # the spike is not in the window
    poison["on"] = False
    out = step()
    assert out.spike is None and state.spikes_in_a_row == 0 and len(state.spikes.losses) == 21
    assert not all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    poison["on"] = True
    step()
    step()
    with pytest.raises(TrainingDiverged, match="3 optimizer steps in a row were skipped as spikes"):
        step()


def test_z_loss_is_added_to_the_training_loss_and_reported_apart(env):
    engine, loader, model = make(env, "fsdp", ["--z-loss", "1e-2"])
    x, y = next(loader)[:2]
    with torch.no_grad():
        logits = model(x).float()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        z = 1e-2 * torch.logsumexp(logits, -1).square().sum()
        model.eval()
        assert torch.allclose(model(x, labels=y, reduction="sum"), ce, rtol=1e-5)  # evaluation: no z-term
        model.train()
        assert torch.allclose(model(x, labels=y, reduction="sum"), ce + z, rtol=1e-5)  # training: with it
    out = engine.train_step([(x, y), (x, y)])
    assert torch.allclose(out.loss_sum, 2 * ce, rtol=1e-5)  # cross-entropy only
    assert torch.allclose(out.z_loss_sum, 2 * z, rtol=1e-5) and out.z_loss_sum > 0


def _policy(model, cfg):
    return [g["weight_decay"] for g in param_groups(model, cfg.weight_decay)]


def _check_invariants(engine, steps):
    """Every group's weight decay is the run's policy; every state has a step tensor of its own == steps."""
    opt = engine.base_optimizer
    assert [g["weight_decay"] for g in opt.param_groups] == [engine.cfg.weight_decay, 0.0]
    step_tensors = [s["step"] for s in opt.state.values()]
    assert step_tensors and len({id(t) for t in step_tensors}) == len(step_tensors), "shared step tensors"
    assert {float(t) for t in step_tensors} == {float(steps)}


@pytest.mark.parametrize("kind", list(ENGINES))
def test_save_load_continues_bit_identically(env, kind, tmp_path):
    ref, ref_loader, _ = make(env, kind)
    straight = [ref.step_loss(ref.train_step(batches(ref_loader))) for _ in range(4)]

    engine, loader, _ = make(env, kind)
    first = [engine.step_loss(engine.train_step(batches(loader))) for _ in range(2)]
    _check_invariants(engine, 2)
    engine.save(str(tmp_path))
    data = loader.state_dict()
    engine2, loader2, _ = make(env, kind)
    engine2.load(str(tmp_path), optimizer_steps=2)
    loader2.load_state_dict(data)
    _check_invariants(engine2, 2)
    assert engine2.current_lr() == engine.current_lr()
    resumed = [engine2.step_loss(engine2.train_step(batches(loader2))) for _ in range(2)]
    assert first + resumed == straight
    assert engine2.current_lr() == ref.current_lr()
    _check_invariants(engine2, 4)


def test_restore_repairs_a_shared_step_and_copied_hyperparameters():
    """The damage DeepSpeed 0.19.8's ZeRO-3 universal load does, on a plain AdamW, and its repair."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    policy = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    shared = torch.tensor(1.0)
    for s in opt.state.values():  # one step tensor for everyone, group 0's hyperparameters everywhere
        s["step"] = shared
    opt.param_groups[1]["weight_decay"] = 0.1
    opt.step()
    assert float(shared) == 1.0 + len(opt.state)  # incremented once per parameter: the bug
    restore_optimizer_invariants(opt, policy, optimizer_steps=2)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    steps = [s["step"] for s in opt.state.values()]
    assert len({id(t) for t in steps}) == len(steps) and {float(t) for t in steps} == {2.0}
