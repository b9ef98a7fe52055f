"""The lean implementation's loss: the demo's cross-entropy at the last position, to float32
rounding, in less time, without the subnormal floats that slow Intel CPUs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SUBNORMAL_EXPONENT = -87.0  # exp(x) is float32-subnormal below x = -87.34


def flush_subnormal_(x: torch.Tensor) -> torch.Tensor:
    """Zero the subnormal entries of ``x`` (|x| below the smallest normal float), in place.

    Confident predictions give gradients below 1.2e-38 (float32's smallest normal: softmax
    entries of exp(-88) and less, divided by the batch): ~1 % of the logits' gradient by epoch
    ~1,000 at p = 113. Intel CPUs multiply subnormals through a microcode assist, ~100x slower than
    normal numbers (a 3830 x 128 x 512 product: 445 ms against 4 ms), which made the folded
    backward 4-5x slower late in training. Such an entry is lost in float32 against any normal
    term of the sums it joins, and AdamW divides by sqrt(v) + 1e-8, so it moves no update; zeroing it
    changes rounding only where a sum holds nothing but subnormals.
    """
    return x.masked_fill_(x.abs() < torch.finfo(x.dtype).tiny, 0.0)


class _CrossEntropy(torch.autograd.Function):
    """The demo's loss (mean of −log_softmax at the label, in float64) to float32 rounding, in
    less than half the time. The exponentials of the max-shifted logits (each ≤ 1) are float32, and
    so is the sum of all but the label's; that sum plus the label's exponential, the log and the
    label's gradient are float64. With the label's term apart, a confident example's loss
    log(1 + others) keeps ``others`` to float32's relative precision where a float32 sum of all
    terms would round 1 + others to 1, without the float64 sum over every logit (~1.2 of ~2.5 ms on
    the test split at p = 113). The label's gradient is −others / sum, exact where 1 − softmax
    cancels (the demo loses it below ~1e-13). The gradient's subnormal entries are zeroed
    (:func:`flush_subnormal_`). The second output, without gradient, counts the examples whose
    label has the largest logit (ties count as correct): the accuracy comes for one comparison."""

    @staticmethod
    def forward(ctx, logits, labels):
        # logits (..., N, V): one run (N, V) or R stacked runs (R, N, V); labels (N,) shared by all
        top = logits.amax(dim=-1, keepdim=True)
        # Terms below e^-87 of the top (subnormal exponentials, ~100x slower to compute and add on
        # Intel CPUs) are exactly 0. Each sum includes the top's 1, so a loss moves by < 113·e^-87.
        exps = F.threshold_(logits - top, SUBNORMAL_EXPONENT, -math.inf).exp_()
        at_label = labels.expand(logits.shape[:-1]).unsqueeze(-1)
        label_exp = exps.gather(-1, at_label)[..., 0]
        others = exps.scatter_(-1, at_label, 0.0).sum(dim=-1).double()
        sums = label_exp.double() + others
        picked = logits.gather(-1, at_label)[..., 0]
        correct = (picked >= top[..., 0]).sum(dim=-1)
        ctx.mark_non_differentiable(correct)
        ctx.save_for_backward(exps, sums, others, at_label)
        return ((top[..., 0] - picked).double() + sums.log()).mean(dim=-1), correct

    @staticmethod
    def backward(ctx, grad, _):
        exps, sums, others, at_label = ctx.saved_tensors
        scale = grad[..., None] / exps.shape[-2]  # each run's mean over its N examples
        grad_logits = exps.mul_((scale / sums).to(exps.dtype)[..., None])  # softmax × scale, 0 at the label
        grad_logits.scatter_(-1, at_label, (-(others / sums) * scale).to(exps.dtype)[..., None])
        return flush_subnormal_(grad_logits), None


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The lean implementation's loss: see :class:`_CrossEntropy`."""
    return _CrossEntropy.apply(logits, labels)[0]


def cross_entropy_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lean loss and how many examples the logits classify correctly (0-d integer tensor)."""
    return _CrossEntropy.apply(logits, labels)


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Examples whose label has the largest logit (ties count, as in :class:`_CrossEntropy`)."""
    return (logits.gather(1, labels[:, None])[:, 0] >= logits.amax(dim=-1)).sum()


def stacked_cross_entropy_and_correct(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-run lean losses (R,) and correct counts (R,) of stacked logits (R, N, V): the same
    function as :func:`cross_entropy_and_correct`, over a leading run dimension."""
    return _CrossEntropy.apply(logits, labels)
