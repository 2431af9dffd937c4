"""How far a resume on another world size lands from an uninterrupted run.

    python benchmarks/resume_gap.py [--engine zero3] [--steps 8] [--root CHECKOUT]

Tiny model, fp32, synthetic data, a global batch of 4 rows: a straight 2-rank run against
2 ranks -> stop at step 2 -> 1 rank to step 4 -> 2 ranks to the end (DeepSpeed goes through its
universal checkpoint, FSDP2 through DCP resharding). Prints and writes the largest loss gap and the
largest relative grad-norm gap of the resumed steps. ``--root`` measures another checkout with this
machine's venv (e.g. ``git worktree add /tmp/old HEAD~1``: the figures before a change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import child_env, free_port  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default="zero3", choices=["fsdp", "zero2", "zero3"])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--root", default=str(HERE), help="checkout to measure (default: this one)")
    p.add_argument("--output", default=str(HERE / "benchmarks" / "results" / "cpu-2core"))
    a = p.parse_args()
    root, work = Path(a.root).resolve(), Path(tempfile.mkdtemp(prefix="resume_gap_"))
    # the flag naming the data kind changed with the run-state rework; read it from the checkout's --help
    helptext = subprocess.run([sys.executable, str(root / "launch" / "pretrain.py"), "--help"], capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(root))).stdout
    data_flag = "--data-kind" if "--data-kind" in helptext else "--data"
    engine = ["--engine", "fsdp"]
    if a.engine != "fsdp":
        ds = json.loads((root / "ds_configs" / f"{a.engine}_bf16.json").read_text())
        ds["bf16"] = {"enabled": "auto"}
        (work / "ds.json").write_text(json.dumps(ds))
        engine = ["--ds_config", str(work / "ds.json")]
    env = child_env(PYTHONPATH=str(root))
    base = [data_flag, "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--max-steps", str(a.steps),
            "--warmup-steps", "1", "--learning-rate", "2e-3", "--log-interval", "1", "--eval-interval", "0",
            "--no-use-tensorboard", "--mixed-precision", "fp32", "--max-grad-norm", "0.5", "--run-dir",
            str(work / "runs")] + engine

    def run(world: int, extra: list[str], name: str, ck: str = "ck") -> list[dict]:
        cmd = ([str(BIN / "torchrun"), "--nproc_per_node", str(world), "--master_port", str(free_port())] if world > 1
               else [sys.executable])
        cmd += [str(root / "launch" / "pretrain.py"), *base, "--batch-size", str(4 // world), "--checkpoint-dir",
                str(work / ck), "--run-name", name, *extra]
        proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        return [json.loads(x) for x in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]

    straight = run(2, [], "straight", ck="ck_straight")
    run(2, ["--stop-at-step", "2"], "first")
    resumed = run(1, ["--resume", "latest", "--stop-at-step", "4"], "on_one")
    resumed += run(2, ["--resume", "latest"], "on_two")
    loss_gap = [abs(s["loss"] - r["loss"]) for s, r in zip(straight[2:], resumed)]
    norm_gap = [abs(s["grad_norm"] - r["grad_norm"]) / max(1.0, s["grad_norm"]) for s, r in zip(straight[2:], resumed)]
    commit = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()
    if subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                      text=True).stdout.strip():
        commit += " (with uncommitted changes)"
    res = {"engine": a.engine, "checkout": str(root), "commit": commit, "steps": a.steps,
           "resumed_steps": [r["step"] for r in resumed], "loss_gap_per_step": loss_gap, "max_loss_gap": max(loss_gap),
           "max_rel_grad_norm_gap": max(norm_gap)}
    print(f"{a.engine}, 2 -> 1 -> 2 ranks vs straight ({commit}): max loss gap {res['max_loss_gap']:.3g}, "
          f"max grad-norm gap {res['max_rel_grad_norm_gap']:.3g} (relative)")
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"resume_gap_{a.engine}_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
