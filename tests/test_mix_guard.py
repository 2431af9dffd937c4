"""The mix, watched and guarded: per-domain validation loss, epochs read per domain, the epoch limit, and a resume
that refuses data other than what the checkpoint was reading (unless asked)."""

import json

from scaletrain.checkpoint.store import step_name
from scaletrain.data.prepare import prepare_domain
from scaletrain.data.sample import create_sample_pretraining_data

from .conftest import launch, read_metrics


def _prepare(tmp_path, seed=0):
    raw = create_sample_pretraining_data(tmp_path / f"raw{seed}", seed=seed, scale=0.02)
    for d in ("arxiv", "general"):
        prepare_domain(d, [str(raw[d])], str(tmp_path / "pre"), quiet=True, shard_tokens=8192, chunk_tokens=1024,
                       val_fraction=0.2, overwrite=True)
    return tmp_path / "pre"


def _args(data, *extra):
    return ["--data-dir", str(data), "--model-size", "tiny", "--max-seq-length", "64", "--batch-size", "4",
            "--max-steps", "6", "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "3",
            "--eval-steps", "2", "--mixed-precision", "fp32", "--engine", "fsdp", *extra]


def test_val_loss_per_domain_epochs_and_a_resume_on_changed_data(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = _prepare(tmp_path)
    first = launch("python", _args(data, "--stop-at-step", "3", "--max-epochs-per-domain", "0.01"), tmp_path)
    metrics = read_metrics(tmp_path)
    evals = [m for m in metrics if "val_loss" in m]
    assert [m["step"] for m in evals] == [3]
    w = {"arxiv": 0.3, "general": 0.7}
    assert evals[0]["val_loss"] == sum(w[d] * evals[0][f"val_loss/{d}"] for d in w) / 1.0
    assert evals[0]["val_loss/arxiv"] != evals[0]["val_loss/general"]
    assert "val_loss/arxiv" in first.stdout and "epochs arxiv" in first.stdout
    # epochs grow by the rows each domain gave: positive, increasing, arxiv past the 0.01 limit -> one warning
    arxiv = [m["epochs/arxiv"] for m in metrics]
    assert 0 < arxiv[0] < arxiv[-1] and arxiv[-1] > 0.01
    assert first.stdout.count("past --max-epochs-per-domain 0.01") == 1
    acc = EventAccumulator(str(tmp_path / "runs" / "t"))
    acc.Reload()
    assert {"val_loss", "val_loss/arxiv", "val_loss/general", "epochs/arxiv", "epochs/general"} <= \
        set(acc.Tags()["scalars"])
    assert acc.Scalars("val_loss/arxiv")[0].value == evals[0]["val_loss/arxiv"]

    # general prepared again from other documents: the checkpoint's read position means nothing there
    raw = create_sample_pretraining_data(tmp_path / "raw-other", seed=7, scale=0.02)
    prepare_domain("general", [str(raw["general"])], str(data), quiet=True, shard_tokens=8192, chunk_tokens=1024,
                   val_fraction=0.2, overwrite=True)
    refused = launch("python", _args(data, "--resume", "latest"), tmp_path, check=False)
    assert refused.returncode != 0
    assert "--data-sources general:" in refused.stderr and "is not the data this checkpoint was reading" in \
        refused.stderr and "--allow-data-change" in refused.stderr
    assert "--data-sources arxiv" not in refused.stderr
    went_on = launch("python", _args(data, "--resume", "latest", "--allow-data-change"), tmp_path)
    assert "--allow-data-change: general changed" in went_on.stdout and "reading it from its start" in went_on.stdout
    resumed = [m for m in read_metrics(tmp_path) if m["step"] == 4][-1]
    assert resumed["epochs/general"] < [m for m in metrics if m["step"] == 3][0]["epochs/general"]


def test_epoch_limit_stop_saves_and_stops(tmp_path):
    data = _prepare(tmp_path)
    proc = launch("python", _args(data, "--max-epochs-per-domain", "0.01", "--epoch-limit", "stop",
                                  "--eval-interval", "0"), tmp_path)
    steps = [m["step"] for m in read_metrics(tmp_path)]
    assert steps[-1] < 6
    assert f"stopped at step {steps[-1]} (--epoch-limit stop): arxiv at" in proc.stdout
    done = json.loads((tmp_path / "checkpoints" / step_name(steps[-1]) / "COMPLETE.json").read_text())
    assert done["step"] == steps[-1]


def test_a_domain_without_a_validation_split_leaves_the_others_validated(tmp_path):
    """One domain prepared with --val-fraction, the other without: the validated domain's loss is reported and the
    run says which domain is left out (it said there was no validation split at all and reported nothing)."""
    raw = create_sample_pretraining_data(tmp_path / "raw", seed=0, scale=0.02)
    for d, val in (("arxiv", 0.2), ("general", 0.0)):
        prepare_domain(d, [str(raw[d])], str(tmp_path / "pre"), quiet=True, shard_tokens=8192, chunk_tokens=1024,
                       val_fraction=val)
    proc = launch("python", _args(tmp_path / "pre", "--max-steps", "3"), tmp_path)
    assert ("validation: general has no validation split (prepare with --val-fraction); val_loss is the mix of "
            "arxiv only") in proc.stdout
    evals = [m for m in read_metrics(tmp_path) if "val_loss" in m]
    assert [m["step"] for m in evals] == [3]
    assert evals[0]["val_loss"] == evals[0]["val_loss/arxiv"] and "val_loss/general" not in evals[0]


def _rows(loader, steps):
    return [tuple(r) for _ in range(steps) for r in next(loader)[0].tolist()]


def test_a_phase_may_add_drop_and_reorder_domains_each_continuing_its_stream(tmp_path):
    """Phases of a run change the mix: arxiv alone, then general added in front, then general alone, then both
    again. Each domain continues its own stream where it was (a domain's shards are shuffled by a key it keeps,
    not by its place in --data-sources), a new domain starts at its beginning, and a domain left out keeps its
    place for a later phase."""
    from dataclasses import replace

    from scaletrain.data.loader import ShardLoader, StreamSpec

    data = _prepare(tmp_path)
    base = StreamSpec(str(data), ("arxiv",), (1.0,), 32, 4, 1, 0, 1, 0)

    def loader(sources, weights, state=None, order=None):
        one = ShardLoader(replace(base, sources=sources, weights=weights, order=order))
        if state is not None:
            one.load_state_dict(state)
        return one

    arxiv, general = _rows(loader(("arxiv",), (1.0,)), 60), _rows(loader(("general",), (1.0,), order=(1,)), 60)
    at = {"arxiv": 0, "general": 0}

    def follows(rows):  # every row is the next of one domain's own stream
        for r in rows:
            d = "arxiv" if at["arxiv"] < len(arxiv) and r == arxiv[at["arxiv"]] else "general"
            assert r == (arxiv if d == "arxiv" else general)[at[d]], f"row not the next of either stream: {at}"
            at[d] += 1

    a = loader(("arxiv",), (1.0,))
    follows(_rows(a, 5))
    b = loader(("general", "arxiv"), (0.5, 0.5), a.state_dict())  # refused before: no position for general
    follows(_rows(b, 8))
    assert at["general"] > 0 and at["arxiv"] > 20
    c = loader(("general",), (1.0,), b.state_dict())
    follows(_rows(c, 3))
    held = at["arxiv"]
    d = loader(("arxiv", "general"), (0.3, 0.7), c.state_dict())  # arxiv from where phase b left it
    follows(_rows(d, 5))
    assert at["arxiv"] > held and d.state_dict()["domain_order"] == {"arxiv": 0, "general": 1}


def test_a_new_mix_of_padded_rows_takes_its_shares_from_the_resume_on(tmp_path):
    """--no-packing draws each row from the domain furthest below its token share: counted over the whole run, a
    mix changed at a resume fed one domain alone until the run's total met the new shares."""
    from scaletrain.data.loader import ShardLoader, StreamSpec

    data = _prepare(tmp_path)
    first = ShardLoader(StreamSpec(str(data), ("arxiv", "general"), (0.3, 0.7), 512, 4, 1, 0, 1, 0, packing=False))
    for _ in range(40):
        next(first)
    then = first.state_dict()["domain_pos"]  # tokens read
    second = ShardLoader(StreamSpec(str(data), ("arxiv", "general"), (0.7, 0.3), 512, 4, 1, 0, 1, 0, packing=False))
    second.load_state_dict(first.state_dict())
    for _ in range(40):
        next(second)
    read = {d: second.state_dict()["domain_pos"][d] - then[d] for d in then}
    assert read["general"] > 0.2 * sum(read.values()), read  # not arxiv alone (before: general read nothing)
    tokens = second.state_dict()["domain_tokens"]  # counted from the resume on
    assert abs(tokens["arxiv"] / sum(tokens.values()) - 0.7) < 0.02, tokens


def test_another_seed_at_a_resume_keeps_the_data_order_of_the_checkpoint(tmp_path):
    """The read positions are positions in the order the checkpoint's seed shuffled: under another --seed the
    shards were shuffled anew beneath them (repeating and skipping documents). The data goes on as it was."""
    from scaletrain.data.loader import ShardLoader, StreamSpec

    data = _prepare(tmp_path)
    straight = ShardLoader(StreamSpec(str(data), ("arxiv", "general"), (0.3, 0.7), 32, 4, 1, 0, 1, 0))
    rows = _rows(straight, 80)
    first = ShardLoader(StreamSpec(str(data), ("arxiv", "general"), (0.3, 0.7), 32, 4, 1, 0, 1, 0))
    assert _rows(first, 40) == rows[:160]
    other = ShardLoader(StreamSpec(str(data), ("arxiv", "general"), (0.3, 0.7), 32, 4, 1, 0, 1, 7))
    other.load_state_dict(first.state_dict())
    assert _rows(other, 40) == rows[160:] and other.state_dict()["seed"] == 0


def test_a_malformed_data_state_is_an_error_not_a_traceback(tmp_path):
    """The state's newer entries (shuffle keys, seed) are read as carefully as its positions."""
    import pytest

    from scaletrain.data.loader import LoaderStateError, ShardLoader, StreamSpec

    data = _prepare(tmp_path)
    spec = StreamSpec(str(data), ("arxiv", "general"), (0.3, 0.7), 32, 4, 1, 0, 1, 0)
    first = ShardLoader(spec)
    _rows(first, 2)
    good = first.state_dict()
    for bad in ({"seed": "x"}, {"domain_order": {"arxiv": "k", "general": 1}}, {"domain_pos": 7}):
        with pytest.raises(LoaderStateError, match="the checkpoint's data-loader state is malformed"):
            ShardLoader(spec).load_state_dict({**good, **bad})


def test_a_validation_pass_longer_than_the_held_out_split_says_so_once(tmp_path):
    data = _prepare(tmp_path)
    val = {d: json.loads((data / d / "manifest.json").read_text())["val"]["tokens"] for d in ("arxiv", "general")}
    # a pass: --eval-steps global batches of 4 rows of 65 tokens, shared by the 2 domains
    steps = 2 * (val["arxiv"] // (4 * 65) + 1)
    assert steps * 4 * 65 // 2 < val["general"]  # only arxiv's split is the smaller
    out = launch("python", _args(data, "--max-steps", "2", "--eval-interval", "1", "--eval-steps", str(steps)),
                 tmp_path).stdout
    assert out.count("validation: the held-out split of arxiv is smaller than a pass") == 1, out
    assert "lower --eval-steps, or prepare with a larger --val-fraction" in out
    (tmp_path / "quiet").mkdir()
    quiet = launch("python", _args(data, "--max-steps", "1", "--eval-interval", "1"), tmp_path / "quiet").stdout
    assert "val_loss/arxiv" in quiet
    assert "smaller than a pass" not in quiet
