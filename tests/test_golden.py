"""The golden loss trace: the tiny preset on the embedded sample shards, fp32, one process, 50 steps.

Any change to the numerics (model, loss, optimizer, schedule) or to the data order (prepare, mixing,
loading) moves these losses; the test compares each step to ``golden/tiny_sample_fp32.json`` at 1e-4
relative, so such a change lands only with a deliberate, reviewed update of that file:

    .venv/bin/python -m tests.test_golden --update
"""

import json
from pathlib import Path

from scaletrain.data.sample import prepare_sample

from .conftest import launch, read_metrics

GOLDEN = Path(__file__).parent / "golden" / "tiny_sample_fp32.json"
ARGS = ["--model-size", "tiny", "--mixed-precision", "fp32", "--data-sources", "arxiv", "general",
        "--data-mix-weights", "0.3", "0.7", "--max-seq-length", "256", "--micro-batch-size", "4", "--max-steps", "50",
        "--warmup-steps", "5", "--learning-rate", "3e-3", "--log-interval", "1", "--eval-interval", "0", "--seed",
        "42", "--no-use-tensorboard", "--engine", "fsdp"]
RTOL = 1e-4


def golden_run(work: Path) -> list[float]:
    """Prepare the sample shards as `make pretrain` does, train, return the per-step losses."""
    shards = prepare_sample(work / "sample", quiet=True)  # what launch/demo.py --prepare-only does
    launch("python", ARGS + ["--data-dir", str(shards), "--checkpoint-dir", str(work / "ck")], work,
           run_name="golden")
    metrics = read_metrics(work, "golden")
    assert [m["step"] for m in metrics] == list(range(1, 51))
    return [m["loss"] for m in metrics]


def test_losses_match_the_golden_file(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert golden["args"] == ARGS, "the golden file was recorded with other flags: update it deliberately"
    got = golden_run(tmp_path)
    bad = [(i + 1, g, want) for i, (g, want) in enumerate(zip(got, golden["losses"]))
           if abs(g - want) > RTOL * abs(want)]
    assert not bad, f"steps whose loss left the golden trace by more than {RTOL:g} relative (step, got, golden): {bad}"


def main() -> None:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--update", action="store_true", help="record the trace anew into the golden file")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        losses = golden_run(Path(work))
    if not a.update:
        print(json.dumps(losses))
        return
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"about": "tests/test_golden.py: tiny preset, sample shards, fp32, one process",
                                  "args": ARGS, "losses": losses}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: first {losses[0]:.4f}, last {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
