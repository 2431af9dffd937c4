import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scaletrain.model import (
    IGNORE_INDEX,
    PRESETS,
    Llama,
    flops_per_token,
    get_model_config,
    hf_state_dict_key,
    num_params,
)


def _hf_model(cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                         tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False)
    return LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_hf_llama(tied):
    torch.manual_seed(0)
    cfg = get_model_config("tiny", tie_embeddings=tied)
    ours = Llama(cfg).eval()
    hf = _hf_model(cfg)
    missing = hf.load_state_dict({hf_state_dict_key(k): v for k, v in ours.state_dict().items()}, strict=False)
    # only the tied head may be absent from our state dict's HF view
    assert not missing.unexpected_keys
    assert set(missing.missing_keys) <= ({"lm_head.weight"} if tied else set())
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(PRESETS) + ["small+biases"])
def test_param_count_is_exact(name):
    if name == "small+biases":  # Qwen2-style q/k/v biases and an output bias
        cfg = dataclasses.replace(get_model_config("small"), qkv_bias=True, out_bias=True)
    else:
        cfg = get_model_config(name)
    with torch.device("meta"):
        model = Llama(cfg)
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())


def test_preset_sizes_match_their_names():
    assert 0.5e6 < num_params(get_model_config("tiny")) < 2e6
    assert 110e6 < num_params(get_model_config("small")) < 140e6
    assert 1.2e9 < num_params(get_model_config("base")) < 1.4e9
    large = get_model_config("large")
    shape = (large.d_model, large.n_layers, large.n_heads, large.ffn_dim, large.vocab_size)
    assert shape == (4096, 32, 32, 11008, 32000)
    assert abs(num_params(large) - 6.74e9) < 0.01e9


@pytest.mark.parametrize("seq", [64, 256])
def test_flops_formula_matches_flop_counter(seq):
    cfg = get_model_config("tiny")
    model = Llama(cfg)
    B = 2
    ids = torch.randint(0, cfg.vocab_size, (B, seq))
    # the math SDPA backend expresses attention as matmuls the counter sees (the CPU flash
    # kernel has no registered formula); it computes the full T x T square, as the formula assumes
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, labels=ids).backward()
    counted = counter.get_total_flops() / (B * seq)
    assert abs(flops_per_token(cfg, seq) / counted - 1) < 0.05, (flops_per_token(cfg, seq), counted)


def test_gradient_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    cfg = get_model_config("tiny")
    model = Llama(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    model(ids, labels=ids).backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model(ids, labels=ids).backward()
    for r, p in zip(ref, model.parameters()):
        torch.testing.assert_close(r, p.grad)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="valid presets: tiny, small, base, large"):
        get_model_config("huge")


def test_meta_init_then_materialise_matches_shapes():
    cfg = get_model_config("tiny")
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("z_weight", [0.0, 1e-2])
def test_chunked_loss_equals_cross_entropy_in_value_and_gradient(dtype, z_weight, monkeypatch):
    """The loss in chunks (here 7 rows of a 50-token vocabulary, so 6 chunks with a short last one), its softmax
    written over the logits for backward, equals F.cross_entropy on the fp32 logits plus the z-term in value
    and gradient; ignored rows add nothing; without a gradient wanted the logits are left as they were."""
    import torch.nn.functional as F

    from scaletrain.model import loss as loss_mod

    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 7 * 50)
    torch.manual_seed(0)
    base = (torch.randn(40, 50) * 3).to(dtype)
    labels = torch.randint(0, 50, (40,))
    labels[[0, 13, 14, 39]] = IGNORE_INDEX
    ref_in = base.clone().requires_grad_()
    x = ref_in.float()
    valid = (labels != IGNORE_INDEX).float()
    ref = F.cross_entropy(x, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    ref_z = z_weight * (torch.logsumexp(x, -1).square() * valid).sum()
    (ref + ref_z).mul(0.37).backward()
    ours_in = base.clone().requires_grad_()
    logits = ours_in * 1  # a non-leaf, as the lm_head's output is
    loss, z = loss_mod.cross_entropy_sum(logits, labels, z_weight)
    loss.mul(0.37).backward()
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(loss, ref + ref_z, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(z, ref_z, rtol=1e-6, atol=1e-6)
    assert not z.requires_grad
    torch.testing.assert_close(ours_in.grad, ref_in.grad, **tol)
    assert ours_in.grad[[0, 13, 14, 39]].abs().sum() == 0
    with torch.no_grad():  # evaluation: no gradient made, the logits untouched
        before = base.clone()
        torch.testing.assert_close(loss_mod.cross_entropy_sum(base, labels, z_weight)[0], ref + ref_z,
                                   rtol=1e-6, atol=1e-5)
        assert torch.equal(base, before)


def test_the_models_loss_is_its_logits_cross_entropy():
    """Llama(ids, labels) in both reductions equals F.cross_entropy over Llama(ids)'s logits, and its gradients
    equal that loss's; the loss keeps only the logits for backward (the estimate's a·V per token)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = Llama(get_model_config("tiny"))
    ids, labels = torch.randint(0, 512, (2, 24)), torch.randint(0, 512, (2, 24))
    labels[0, :5] = IGNORE_INDEX
    logits = model(ids)
    for reduction in ("sum", "mean"):
        ref = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                              reduction=reduction)
        torch.testing.assert_close(model(ids, labels=labels, reduction=reduction), ref, rtol=1e-6, atol=1e-6)
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(ids, labels=labels).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6, msg=n)


def test_the_losss_fp16_gradient_keeps_small_probabilities():
    """fp16 logits (loss scaled by 4096, as fp16 training's loss scaler does): the gradient of probabilities of 1e-7
    to 1e-5, subnormal in fp16 if stored unscaled (rounded to 6e-8 steps, errors up to 30%), keeps fp16's relative
    precision, as F.cross_entropy's gradient (scaled before it is stored in fp16) does."""
    import torch.nn.functional as F

    from scaletrain.model.loss import cross_entropy_sum

    torch.manual_seed(0)
    base = (torch.randn(64, 4096) * 2).half()
    labels = torch.randint(0, 4096, (64,))
    ref_in = base.float().requires_grad_()
    (F.cross_entropy(ref_in, labels, reduction="sum") * 4096).backward()
    old_in = base.clone().requires_grad_()
    (F.cross_entropy(old_in.float(), labels, reduction="sum") * 4096).backward()
    ours_in = base.clone().requires_grad_()
    (cross_entropy_sum(ours_in * 1, labels)[0] * 4096).backward()
    small = (ref_in.grad.abs() > 4096e-7) & (ref_in.grad.abs() < 4096e-5)
    assert small.sum() > 10_000

    def rel(g):
        return ((g.float() - ref_in.grad).abs() / ref_in.grad.abs())[small].max()

    assert rel(old_in.grad) < 1e-3 and rel(ours_in.grad) < 1e-3, (rel(old_in.grad), rel(ours_in.grad))
