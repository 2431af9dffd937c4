"""The language-model loss without the vocabulary-sized fp32 tensors.

``F.cross_entropy(logits.float(), labels)`` makes an fp32 copy of the logits, keeps log-softmax's fp32 output
for backward, and its backward holds three fp32 V-vectors at once: 12V bytes per token, which at
a 128k vocabulary and 8k tokens a micro-step is 12.6 GB, near the 14.9 GB of Llama-3.2-1B's fp32 weights and
AdamW moments.

``cross_entropy_sum`` goes through the logits a chunk of rows at a time in fp32 and, when a gradient is
wanted, writes each row's softmax(x)·(1 + 2·z·lse) over its logits in place (as Liger-Kernel's cross-entropy
writes its gradient; the logits are the lm_head's output, needed by nothing else). Backward scales that
buffer by the incoming gradient g and subtracts g at each label, a chunk at a time in fp32. So the loss holds
the logits buffer (a·V bytes per token, a the logits' dtype size) and the labels, plus one chunk's fp32
temporaries, with log-softmax's arithmetic and no recomputation (measured in fp32 against float64: the same
mean relative error per gradient element as F.cross_entropy's, 2.45e-7). fp16 logits hold the softmax times
``FP16_SCALE``, so small probabilities stay out of fp16's subnormals. Rows labelled ``IGNORE_INDEX`` contribute
nothing.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 2**24  # logits per chunk: 64 MiB in fp32 (131 rows at a 128k vocabulary)
# fp16 logits hold the softmax times this: fp16's normal range starts at 6.1e-5, so a 128k vocabulary's
# probabilities (~1e-5 and below) would be subnormal, rounded to 6e-8 steps; times 2^10 they keep 11 bits
# down to 6e-8 (before, the gradient was stored in fp16 after the loss scale, which plays the same part)
FP16_SCALE = 1024.0


def chunk_rows(vocab_size: int) -> int:
    """Rows of logits processed at a time (its fp32 temporaries are what the loss adds to the logits)."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


class _CrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, z_weight: float):
        want_grad = ctx.needs_input_grad[0]
        ce = torch.zeros((), dtype=torch.float32, device=logits.device)
        z = torch.zeros((), dtype=torch.float32, device=logits.device)
        step = chunk_rows(logits.shape[1])
        for s in range(0, logits.shape[0], step):
            x = logits[s:s + step].float()  # fp32 logits: the same memory, where the softmax is then made
            y = labels[s:s + step]
            valid = y != IGNORE_INDEX
            target = torch.where(valid, y, 0)[:, None]
            # as log_softmax does it: (x - max) - log(sum(exp(x - max))), each row's shift applied first
            m = x.amax(dim=-1, keepdim=True)
            x = x.sub_(m) if want_grad or x.dtype != logits.dtype else x - m
            log_sum = x.exp().sum(dim=-1).log()
            ce += ((log_sum - x.gather(1, target)[:, 0]) * valid).sum()
            if z_weight:
                lse = m[:, 0] + log_sum
                z += (lse.square() * valid).sum()
            if want_grad:
                x.sub_(log_sum[:, None]).exp_()  # softmax: the gradient but for the label's -1 (backward's)
                if z_weight:  # d(z·lse²)/dx = 2·z·lse·softmax
                    x.mul_((1 + 2 * z_weight * lse)[:, None])
                x.mul_(valid[:, None])
                if logits.dtype == torch.float16:
                    x.mul_(FP16_SCALE)
                if x.dtype != logits.dtype:
                    logits[s:s + step].copy_(x)
        if want_grad:
            ctx.save_for_backward(logits, labels)  # the logits now hold the softmax
        z = z * z_weight
        ctx.mark_non_differentiable(z)
        return ce + z, z

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _):
        # g·softmax - g·onehot(label), in fp32 a chunk at a time, in the order log-softmax's and nll_loss's
        # backward take (the scale first, then the label's -g)
        d_logits, labels = ctx.saved_tensors
        step = chunk_rows(d_logits.shape[1])
        for s in range(0, d_logits.shape[0], step):
            x = d_logits[s:s + step].float()
            y = labels[s:s + step]
            valid = y != IGNORE_INDEX
            x.mul_(grad / FP16_SCALE if d_logits.dtype == torch.float16 else grad)
            x.scatter_add_(1, torch.where(valid, y, 0)[:, None], (-grad * valid)[:, None].to(x.dtype))
            if x.dtype != d_logits.dtype:
                d_logits[s:s + step].copy_(x)
        return d_logits, None, None


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, z_weight: float = 0.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy + z_weight·Σ lse², the z-term alone, detached) over rows of ``logits`` (N, V) whose
    ``labels`` (N,) are not ``IGNORE_INDEX``. With a gradient wanted, ``logits`` is overwritten by their softmax
    (backward makes the gradient there): pass the lm_head's output, used by nothing else."""
    return _CrossEntropySum.apply(logits, labels, float(z_weight))
