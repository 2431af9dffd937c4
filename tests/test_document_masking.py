"""--document-masking: in a packed row each document sees only itself, as if it were run on its own."""

import pytest
import torch

from scaletrain.model import Llama, get_model_config
from scaletrain.model.llama import document_ids, document_positions

from .conftest import launch, read_metrics

EOS = 3


def packed_row(lengths, vocab, seed=0):
    """A row of documents of ``lengths`` tokens, each ending with EOS (the last one cut short, as packing does)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        d = torch.randint(4, vocab, (n,), generator=g)
        d[-1] = EOS
        docs.append(d)
    docs[-1] = docs[-1][:-3]  # the row ends inside the last document
    return docs, torch.cat(docs)[None]


def test_document_ids_and_positions():
    ids = torch.tensor([[5, 6, EOS, 7, EOS, 8, 9]])
    assert document_ids(ids, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 2]]
    assert document_positions(document_ids(ids, EOS)).tolist() == [[0, 1, 2, 0, 1, 0, 1]]


@pytest.mark.parametrize("restart", [True, False])
def test_a_packed_rows_logits_equal_each_document_run_alone(restart):
    torch.manual_seed(0)
    cfg = get_model_config("tiny")
    model = Llama(cfg).eval()
    docs, row = packed_row([37, 5, 60, 30], cfg.vocab_size)
    model.set_document_masking(EOS, restart_positions=restart)
    with torch.no_grad():
        packed = model(row)[0]
        model.set_document_masking(None)
        start = 0
        for d in docs:
            alone = model(d[None])[0]
            torch.testing.assert_close(packed[start:start + len(d)], alone, rtol=1e-5, atol=1e-5)
            start += len(d)
        plain = model(row)[0]
    assert (plain[40:] - packed[40:]).abs().max() > 1e-2  # without the mask later documents see earlier ones


def test_flex_attention_path_equals_the_masked_path():
    """The FlexAttention path (what CUDA runs) gives the masked SDPA path's logits; here on CPU, compiled by
    inductor (torch 2.13 has no FlexAttention backward on CPU: the gradients are checked on a GPU, by
    benchmarks/document_masking.py)."""
    torch.manual_seed(0)
    cfg = get_model_config("tiny", n_layers=1)
    model = Llama(cfg).eval()
    _, row = packed_row([50, 20, 40, 20], cfg.vocab_size)
    row = row[:, :128]
    out = {}
    with torch.no_grad():
        for flex in (False, True):
            model.set_document_masking(EOS, restart_positions=True, flex=flex)
            out[flex] = model(row)
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-5)


def test_a_run_with_document_masking(tmp_path):
    from scaletrain.data.sample import prepare_sample

    shards = prepare_sample(tmp_path / "sample", quiet=True)
    proc = launch("python", ["--data-dir", str(shards), "--max-steps", "3", "--max-seq-length", "128",
                             "--batch-size", "2", "--eval-interval", "0", "--no-use-tensorboard", "--log-interval", "1",
                             "--document-masking", "--restart-positions", "--engine", "fsdp"], tmp_path)
    assert "attention within documents (EOS" in proc.stdout and "positions restart per document" in proc.stdout
    assert len(read_metrics(tmp_path)) == 3
    bad = launch("python", ["--data-kind", "synthetic", "--document-masking"], tmp_path, check=False)
    assert bad.returncode == 1 and "--document-masking: needs prepared data" in bad.stderr
