"""Run under torchrun (2 ranks): ragged micro-batches (padded rows of very different lengths) through each
engine must give the gradient of ONE big batch of all the step's rows with the loss averaged per target
token. Rank 0 writes the largest differences to OUT.json, and the old per-micro-batch averaging's gap
for comparison; each engine then saves into OUT.json's folder, under its name, with each rank's estimate of its part.

    torchrun --nproc_per_node 2 tests/grad_worker.py OUT.json DS_ZERO2.json DS_ZERO3.json
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

from scaletrain.checkpoint.manager import checkpoint_bytes
from scaletrain.cli import parse_config
from scaletrain.engine import get_engine_class
from scaletrain.model import IGNORE_INDEX
from scaletrain.trainer import build_model

T, MBS, GAS = 48, 2, 2
ARGV = ["--model-size", "tiny", "--max-seq-length", str(T), "--batch-size", str(MBS), "--gradient-accumulation-steps",
        str(GAS), "--mixed-precision", "fp32", "--max-steps", "10", "--warmup-steps", "1", "--seed", "3"]


def ragged_batches(world: int, vocab: int) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(micro-step, rank) -> (input_ids, labels); rank 0's first micro-batch holds rows of 2-6 target tokens,
    the others up to T: the case where a per-micro-batch mean weighs a token ~10x more in one batch."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for gi in range(GAS):
        for r in range(world):
            x = torch.randint(vocab, (MBS, T), generator=g)
            y = torch.randint(vocab, (MBS, T), generator=g)
            hi = 6 if (gi, r) == (0, 0) else T
            lengths = torch.randint(2, hi + 1, (MBS,), generator=g)
            y[torch.arange(T)[None, :] >= lengths[:, None]] = IGNORE_INDEX  # right padding
            out[(gi, r)] = (x, y)
    return out


def reference(cfg, data) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(per-token mean over one big batch, the old mean-per-micro-batch average) gradients."""
    model = build_model(cfg)
    x = torch.cat([v[0] for v in data.values()])
    y = torch.cat([v[1] for v in data.values()])
    F.cross_entropy(model(x).view(-1, model.config.vocab_size), y.view(-1), ignore_index=IGNORE_INDEX).backward()
    right = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for xb, yb in data.values():
        (model(xb, labels=yb) / len(data)).backward()
    old = {n: p.grad.clone() for n, p in model.named_parameters()}
    return right, old


def gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    va, vb = (torch.cat([d[n].flatten().double() for n in a]) for d in (a, b))
    return float(va @ vb / (va.norm() * vb.norm()))


def main() -> None:
    out_path, zero2, zero3 = sys.argv[1:4]
    env = get_engine_class("deepspeed").init_distributed()
    results = {}
    data = None
    for kind, extra in (("fsdp", ["--engine", "fsdp"]), ("zero2", ["--ds_config", zero2]),
                        ("zero3", ["--ds_config", zero3])):
        cfg = parse_config(ARGV + extra)
        cls = get_engine_class(cfg.resolved_engine)
        cfg = cls.resolve_config(cfg, env.world_size, env.device.type).freeze()
        if data is None:
            data = ragged_batches(env.world_size, build_model(cfg).config.vocab_size)
            right, old = reference(cfg, data)
            results["old_averaging"] = {"max_abs_gap": gap(old, right), "cosine": cosine(old, right)}
        model = build_model(cfg)
        engine = cls(model, cfg, env)
        mine = [data[(gi, env.rank)] for gi in range(GAS)]
        loss_sum, n = engine.accumulate(mine)  # the step's target tokens are counted over both ranks
        grads = engine.full_gradients()
        total = engine.all_reduce_sum(loss_sum) / n
        engine.optimizer_step()
        shares = [None] * env.world_size  # --max-time's estimate of each rank's part of a save, against the files
        torch.distributed.all_gather_object(shares, engine.checkpoint_share(checkpoint_bytes(model.config)))
        engine.save(os.path.join(os.path.dirname(out_path), kind))
        results[kind] = {"max_abs_gap": gap(grads, right), "max_abs_grad": max(float(g.abs().max()) for g in
                                                                               right.values()),
                         "cosine": cosine(grads, right), "num_tokens": n, "loss": float(total), "shares": shares}
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
