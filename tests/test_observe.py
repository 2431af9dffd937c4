"""Seeing inside a run, read back as a user would: the profiler trace parses, the samples are in TensorBoard's
text plugin and samples.jsonl, `scaletrain plot` draws two runs, and the estimate table is in the run's log."""

import json

import pytest

from scaletrain.data.prepare import prepare_domain
from scaletrain.data.sample import create_sample_pretraining_data

from .conftest import launch, read_metrics


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("observe")
    raw = create_sample_pretraining_data(root, scale=0.04)
    for d in ("arxiv", "general"):
        prepare_domain(d, [str(raw[d])], str(root / "pre"), quiet=True, shard_tokens=4096, chunk_tokens=1024,
                       val_fraction=0.1)
    return root / "pre"


def test_profile_samples_and_plot_from_real_runs(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"arxiv": ["\\begin{proof}"], "general": ["Once upon a time"]}))
    args = ["--data-dir", str(shards), "--model-size", "tiny", "--max-seq-length", "64", "--batch-size", "2",
            "--max-steps", "4", "--log-interval", "2", "--eval-interval", "2", "--eval-steps", "2",
            "--profile-steps", "2:3", "--profile-rank0-only", "--sample-tokens", "6", "--sample-top-p", "0.9",
            "--sample-prompts", str(prompts)]
    proc = launch("torchrun", args, tmp_path, nproc=2)
    run = tmp_path / "runs" / "t"
    # the estimate table is printed at the start
    assert "scaletrain: memory per device, estimated (fsdp):" in proc.stdout
    assert "peak" in proc.stdout and "at the backward start" in proc.stdout
    # the trace of steps 2-3, rank 0 only, is Chrome trace JSON with both profiler steps in it
    traces = sorted((run / "profile").iterdir())
    assert [t.name for t in traces] == ["rank0.steps2-3.pt.trace.json"], traces
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 2, steps
    assert any(e.get("name") == "aten::mm" for e in events)
    assert f"scaletrain: step 3: profiler trace {traces[0]}" in proc.stdout
    # samples: greedy and top-p for each domain's prompt, at steps 2 and 4, in samples.jsonl and TensorBoard
    lines = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {(x["step"], x["domain"], x["prompt"], x["decoding"]) for x in lines} == {
        (s, d, p, h) for s in (2, 4) for d, p in (("arxiv", "\\begin{proof}"), ("general", "Once upon a time"))
        for h in ("greedy", "top-p 0.9")}
    assert all(isinstance(x["text"], str) for x in lines)
    acc = EventAccumulator(str(run))
    acc.Reload()
    text_tags = [t for t in acc.Tags()["tensors"] if t.startswith("samples/")]
    assert sorted(text_tags) == ["samples/arxiv/text_summary", "samples/general/text_summary"]
    shown = acc.Tensors("samples/general/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "**Once upon a time** _(greedy)_" in shown and "_(top-p 0.9)_" in shown
    assert "sample general (greedy): 'Once upon a time' -> " in proc.stdout
    # data_wait is logged; a second run, then the plot of both
    assert all(0 <= m["data_wait"] <= 1 for m in read_metrics(tmp_path) if "data_wait" in m)
    launch("python", ["--data-kind", "synthetic", "--model-size", "tiny", "--max-seq-length", "32", "--batch-size",
                      "2", "--max-steps", "4", "--log-interval", "1", "--checkpoint-dir", str(tmp_path / "ck_other")],
           tmp_path, run_name="other")
    from scaletrain.plot import main as plot_main

    png = tmp_path / "curves.png"
    plot_main([str(run), str(tmp_path / "runs" / "other"), "--output", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    from scaletrain.errors import ScaletrainError
    from scaletrain.plot import plot

    before = (run / "metrics.jsonl").read_bytes()  # a slip of the shell: the metrics file named as the image
    with pytest.raises(ScaletrainError, match=r"--output .*metrics.jsonl: .jsonl is not an image format it writes "
                                              r"\(.*png.*\); give e.g. --output metrics.png"):
        plot([str(run)], str(run / "metrics.jsonl"))
    assert (run / "metrics.jsonl").read_bytes() == before


def test_observe_flags_are_checked(tmp_path):
    from scaletrain.cli import parse_config
    from scaletrain.config import ConfigError

    for flags, message in ((["--profile-steps", "3:2"], "--profile-steps: '3:2': give A:B"),
                           (["--profile-steps", "x"], "give A:B"),
                           (["--profile-steps", "200:201"], "starts at step 200, after --max-steps 100"),
                           (["--profile-rank0-only"], "needs --profile-steps"),
                           (["--memory-snapshot-step", "3"], "needs --memory-snapshot"),
                           (["--sample-top-p", "1.5"], "--sample-top-p: must be in [0, 1]")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_config(flags)
    from scaletrain.samples import load_prompts

    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"arxvi": ["x"]}))
    with pytest.raises(ConfigError, match="names arxvi, which this run does not train on"):
        load_prompts(str(bad), ["arxiv", "general"])
    bad.write_text(json.dumps({"arxiv": ["x", " "]}))
    with pytest.raises(ConfigError, match="an empty prompt under arxiv"):
        load_prompts(str(bad), ["arxiv", "general"])
    lines = tmp_path / "p.txt"
    lines.write_text("one\n\ntwo\n")
    assert load_prompts(str(lines), ["a", "b"]) == {"a": ["one", "two"], "b": ["one", "two"]}
    lines.write_bytes(b"\xff\xfe one")  # saved as UTF-16 by an editor: said, not a UnicodeDecodeError traceback
    with pytest.raises(ConfigError, match=r"p.txt is not UTF-8 text \(byte 0: invalid start byte\)"):
        load_prompts(str(lines), ["a"])
    proc = launch("python", ["--data-kind", "synthetic", "--max-steps", "2", "--memory-snapshot"], tmp_path,
                  check=False)
    assert proc.returncode == 1
    assert "error: --memory-snapshot: records the CUDA allocator's history; this run is on cpu" in proc.stderr


@pytest.mark.parametrize("masking", [False, True])
def test_samples_of_all_prompts_in_one_batch_equal_each_prompt_alone(masking):
    """Every prompt's continuation is generated in one batch, one forward pass per new token, padded on the right;
    each greedy row equals the row decoded alone (rows of different lengths, one cut to the model's window, one
    stopping at EOS early), with and without document masking."""
    import torch

    from scaletrain.model import Llama, get_model_config
    from scaletrain.samples import continue_prompts

    torch.manual_seed(0)
    model = Llama(get_model_config("tiny")).eval()
    eos = 3
    if masking:
        model.set_document_masking(eos)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(4, 512, (n,), generator=g).tolist() for n in (3, 11, 1, 6)]
    rows[1][4] = eos  # a document boundary inside a prompt
    max_len, new_tokens = 8, 7

    def alone(ids, stop):
        out = list(ids)
        for _ in range(new_tokens):
            with torch.no_grad():
                nxt = int(model(torch.tensor([out[-max_len:]]))[0, -1].argmax())
            out.append(nxt)
            if nxt == stop:
                break
        return out[len(ids):]

    expected = [alone(r, None) for r in rows]
    # an EOS id that makes one row stop after its third new token, as that row of the batch must
    k = 2
    row = next(i for i, e in enumerate(expected) if e[k] not in e[:k])
    stop_at = expected[row][k]
    expected_eos = [alone(r, stop_at) for r in rows]
    calls = []

    def forward(batch):
        calls.append(batch.shape)
        return model(batch)

    assert continue_prompts(forward, rows, new_tokens, max_len, torch.device("cpu"), None, [0.0] * 4) == expected
    assert len(calls) == new_tokens and all(s[0] == 4 for s in calls), calls
    got = continue_prompts(model, rows, new_tokens, max_len, torch.device("cpu"), stop_at, [0.0] * 4)
    assert got == expected_eos and len(got[row]) == k + 1
    # a nucleus row beside them draws from the seeded generator: the same seed, the same text
    tops = [0.0, 0.9, 0.0, 0.9]
    a, b = (continue_prompts(model, rows, new_tokens, max_len, torch.device("cpu"), None, tops,
                             torch.Generator().manual_seed(5)) for _ in range(2))
    assert a == b and a[0] == expected[0] and a[2] == expected[2]
