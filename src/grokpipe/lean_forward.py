"""A lean forward pass: the same function as HookedTransformer's last-position logits, cheaper.

Training only ever uses the logits at the last position. HookedTransformer computes attention
output, MLP and unembedding at every position; here they are computed at the last position only,
on the very same parameters (the HookedTransformer remains the model of record: same state dict,
same optimizer, same checkpoints). Deeper models run their earlier layers in full.

With one layer the layer input is the embedding alone, so keys, values and the query come from
per-(position, token) tables, and the model folds further (``_single_layer_logits``): the MLP input
and the residual stream's direct logits are a weighted sum of P·H + 1 table rows per example, and
the MLP output reaches the logits through the one matrix W_out @ W_U.

Multiply-accumulates per example, one layer, P = 3 positions, H heads of E dims, d = d_model,
m = d_mlp, p outputs (the demo: H·E = d = 128, m = 512, p = 113):

=====================  ==========================================  ===========  ===========
                       terms                                        unfolded     folded
=====================  ==========================================  ===========  ===========
forward (evaluation)   P·H·E + H·E·d + d·m + m·d + d·p  (unfolded)  161.5 K      66.0 K
                       (P·H + 1)·(m + p) + m·p          (folded)
forward (training)     folded + P·H·E + H·E·d (resid_mid kept)      161.5 K      82.4 K
backward               2·m·p + 2·d·(m + p) + 2·(P·H·E + H·E·d)      323.0 K      308.4 K
=====================  ==========================================  ===========  ===========

An epoch at p = 113, 30 % train (3,830 examples trained, 8,939 evaluated) is 3.30 G MACs unfolded
and 2.08 G MACs (4.2 GFLOP) folded; the tables themselves cost ~25 M MACs per call. At the ~110
GFLOP/s the matrix products reach on two cores of this machine that is a floor of ~38 ms/epoch
(bench/bench_training.py prints the floor measured on the machine it runs on).

Checked against HookedTransformer in the tests (logits and gradients agree to float32 rounding).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import LEAN_ACT_FNS

ACTIVATIONS = {name: getattr(F, name) for name in LEAN_ACT_FNS}  # torch.nn.functional.relu, ...
_COMPOSED_BACKWARD = False  # tests set it to check, on the CPU, the backward other devices take


def unsupported_reason(cfg) -> str | None:
    """Why the lean forward cannot stand in for this config (None when it can)."""
    checks = {
        "normalization_type is set": cfg.normalization_type is not None,
        f"act_fn {cfg.act_fn!r}": not cfg.attn_only and cfg.act_fn not in ACTIVATIONS,
        "non-standard positional embedding": cfg.positional_embedding_type != "standard",
        "gated MLP": cfg.gated_mlp,
        "grouped-query attention": cfg.n_key_value_heads is not None,
        "parallel attention and MLP": cfg.parallel_attn_mlp,
        "attention without scaling or with extra options": (
            not cfg.use_attn_scale
            or cfg.use_qk_norm
            or cfg.attn_scores_soft_cap > 0
            or cfg.output_logits_soft_cap > 0
            or cfg.attn_types is not None
            or cfg.use_attention_sinks
            or cfg.scale_attn_by_inverse_layer_idx
        ),
    }
    for reason, failed in checks.items():
        if failed:
            return reason
    return None


def _attention(attn, q, k, v, causal: bool):
    """q: (B, Q, H, E); k, v: (B, K, H, E) -> attention output (B, Q, d_model)."""
    scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / attn.attn_scale
    if causal:
        n_q, n_k = scores.shape[-2:]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    z = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(dim=-1), v)
    return torch.einsum("bqhe,hed->bqd", z, attn.W_O) + attn.b_O


def _mlp(block, x, act):
    mlp = block.mlp
    if x.ndim == 2:  # addmm fuses the bias add into the matmul
        return torch.addmm(mlp.b_out, act(torch.addmm(mlp.b_in, x, mlp.W_in)), mlp.W_out)
    return act(x @ mlp.W_in + mlp.b_in) @ mlp.W_out + mlp.b_out


def _proj(x, w, b):
    """x: (..., d_model) with w: (H, d_model, E) -> (..., H, E)."""
    return torch.einsum("...d,hde->...he", x, w) + b


def _heads_matrix(w):
    """(H, d_model, E) -> (d_model, H*E), so one matmul projects every head."""
    return w.permute(1, 0, 2).reshape(w.shape[1], -1)


def _padded(n: int) -> int:
    """Width of the logit columns in the folded products: a multiple of 16 floats (64 bytes). At
    p = 113 this makes the largest product ~25 % faster on this machine's MKL, more than the 13 %
    extra (zero) columns cost."""
    return -(-n // 16) * 16


@dataclass(frozen=True)
class TokenPlan:
    """Where each example's rows sit in the folded tables of a one-layer model.

    It depends only on the tokens (fixed for a run), so it is built once per token tensor. Tables
    hold only the (position, token) pairs and last tokens that occur: at p = 113 that is 227 pairs
    and one last token ("=") instead of 3 × 114 and 114.
    """

    n_examples: int
    n_rows: int  # of the folded tables: (pair, head) value rows, then one row per last token
    pair_pos: torch.Tensor  # (U,): position of each (position, token) pair that occurs
    pair_tok: torch.Tensor  # (U,): its token
    query_tok: torch.Tensor  # (Q,): each last token that occurs
    pair_index: torch.Tensor  # (B, P): each example's pairs
    query_index: torch.Tensor  # (B,): its last token
    score_index: torch.Tensor  # (P·B,): column of the (H, U·Q) score table for each position's key, per example
    row_index: torch.Tensor  # (B, H·P + 1): its value rows (head-major: h·U + pair) then its last token's row
    # row_index read the other way: each row's first entry, the examples in row order, and that order
    by_row: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    @classmethod
    def build(cls, tokens: torch.Tensor, n_vocab: int, n_heads: int) -> TokenPlan:
        n_batch, n_pos = tokens.shape
        positions = torch.arange(n_pos, device=tokens.device)
        # Sorted unique ids keep each example's rows ascending (a valid CSR row, see by_row).
        pairs, pair_index = torch.unique(positions * n_vocab + tokens, return_inverse=True)
        query_tok, query_index = torch.unique(tokens[:, -1], return_inverse=True)
        heads = torch.arange(n_heads, device=tokens.device)
        value_rows = (heads[:, None] * len(pairs) + pair_index[:, None, :]).reshape(n_batch, -1)
        row_index = torch.cat([value_rows, len(pairs) * n_heads + query_index[:, None]], dim=1)
        flat = row_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        n_rows = len(pairs) * n_heads + len(query_tok)
        starts = torch.zeros(n_rows, dtype=torch.int64, device=tokens.device)
        starts[1:] = torch.bincount(flat, minlength=n_rows).cumsum(0)[:-1]
        return cls(
            n_examples=n_batch,
            n_rows=n_rows,
            pair_pos=pairs // n_vocab,
            pair_tok=pairs % n_vocab,
            query_tok=query_tok,
            pair_index=pair_index,
            query_index=query_index,
            score_index=(pair_index * len(query_tok) + query_index[:, None]).T.reshape(-1),
            row_index=row_index,
            by_row=(starts, order // row_index.shape[1], order),
        )


def _row_sum(rows, weights, plan: TokenPlan, part: slice = slice(None)):
    """``out[b] = sum_j weights[b, j] * rows[row_index[b, j]]``: a few table rows per example
    (for the examples in ``part``; ``weights`` are theirs)."""
    return F.embedding_bag(plan.row_index[part], rows, per_sample_weights=weights, mode="sum")


BLOCK = 512  # examples per block on the CPU: [pre | direct] of a block is 1.3 MB at the demo's size


def _blocks(n: int, device: torch.device) -> list[slice]:
    """Blocks of examples: on the CPU small enough to stay in cache between steps (~20 % faster
    than whole-batch passes at the demo's size); elsewhere the whole batch at once."""
    step = BLOCK if device.type == "cpu" else max(n, 1)
    return [slice(start, start + step) for start in range(0, n, step)]


def _row_sum_backward(grad, rows, weights, plan: TokenPlan):
    """Gradients of :func:`_row_sum` for rows and weights, in work that scales with the rows.

    The rows' gradient is the same weighted sum read the other way (one bag of examples per row,
    again an embedding_bag); the weights' gradient is the dot products at the (example, row) pairs
    only (an SDDMM). torch's own embedding_bag backward does this several times slower on the CPU.
    """
    starts, examples, order = plan.by_row
    grad_rows = F.embedding_bag(examples, grad, starts, mode="sum", per_sample_weights=weights.reshape(-1)[order])
    n_per_example = plan.row_index.shape[1]
    crow = torch.arange(0, weights.numel() + 1, n_per_example, device=grad.device)
    with warnings.catch_warnings():  # torch says once per process that sparse CSR is "beta"
        warnings.simplefilter("ignore", UserWarning)
        pairs = torch.sparse_csr_tensor(
            crow, plan.row_index.reshape(-1), weights.reshape(-1), (plan.n_examples, len(rows)), check_invariants=False
        )
    grad_weights = torch.sparse.sampled_addmm(pairs, grad, rows.T, beta=0.0).values().view_as(weights)
    return grad_rows, grad_weights


class _RowSum(torch.autograd.Function):
    """:func:`_row_sum` with :func:`_row_sum_backward` (one-layer attention-only models)."""

    @staticmethod
    def forward(ctx, rows, weights, plan: TokenPlan):
        ctx.save_for_backward(rows, weights)
        ctx.plan = plan
        return _row_sum(rows, weights, plan)

    @staticmethod
    def backward(ctx, grad):
        rows, weights = ctx.saved_tensors
        return *_row_sum_backward(grad.contiguous(), rows, weights, ctx.plan), None


_aten = torch.ops.aten
_ACT_BACKWARD = {  # (grad, act's input, act's output, grad_input=out) -> gradient at the input, into out
    "relu": lambda grad, pre, hidden, out: _aten.threshold_backward.grad_input(grad, hidden, 0, grad_input=out),
    "gelu": lambda grad, pre, hidden, out: _aten.gelu_backward.grad_input(grad, pre, grad_input=out),
    "silu": lambda grad, pre, hidden, out: _aten.silu_backward.grad_input(grad, pre, grad_input=out),
}


class _FoldedLogits(torch.autograd.Function):
    """Logits of a one-layer model from its folded tables, with one hand-written backward.

    ``out = row_sum(rows, weights)`` holds [MLP pre-activation | direct logits] per example and
    ``logits = direct + act(pre) @ folded``. Written as one function so the activation runs in
    place and the gradient of ``out`` is assembled in one buffer (autograd would zero-fill and add
    a full-size gradient for each of the two column slices).
    """

    @staticmethod
    def forward(ctx, rows, weights, folded, plan: TokenPlan, act_fn: str):
        out = _row_sum(rows, weights, plan)
        d_mlp = folded.shape[0]
        pre, direct = out[:, :d_mlp], out[:, d_mlp:]
        if act_fn == "relu":  # its backward needs only the output: overwrite the input
            hidden, pre = pre.relu_(), None
        else:
            hidden = ACTIVATIONS[act_fn](pre)
        ctx.save_for_backward(rows, weights, folded, pre, hidden)
        ctx.plan, ctx.act_fn = plan, act_fn
        return torch.addmm(direct, hidden, folded)

    @staticmethod
    def backward(ctx, grad):
        rows, weights, folded, pre, hidden = ctx.saved_tensors
        grad = grad.contiguous()
        d_mlp = folded.shape[0]
        grad_out = torch.empty(len(grad), rows.shape[1], dtype=grad.dtype, device=grad.device)
        _ACT_BACKWARD[ctx.act_fn](grad @ folded.T, pre, hidden, grad_out[:, :d_mlp])
        grad_out[:, d_mlp:] = grad
        grad_folded = hidden.T @ grad
        grad_rows, grad_weights = _row_sum_backward(grad_out, rows, weights, ctx.plan)
        return grad_rows, grad_weights, grad_folded, None, None


@dataclass
class _Attention:
    """The last query's attention in a one-layer model, from per-(position, token) tables.

    Head-major throughout (heads lead every table), so the per-head products are plain batched
    matrix products over contiguous blocks."""

    plan: TokenPlan
    query_embed: torch.Tensor  # (Q, d_model): embedding + position of each last token
    values: torch.Tensor  # (H, U, E): value of each (position, token) pair per head
    pattern: torch.Tensor  # (H, P, B): the last query's attention over positions


def _single_layer_attention(model, plan: TokenPlan) -> _Attention:
    attn = model.blocks[0].attn
    W_E, W_pos = model.embed.W_E, model.pos_embed.W_pos
    n_batch, n_pos = plan.pair_index.shape
    pair_embed = W_E[plan.pair_tok] + W_pos[plan.pair_pos]  # (U, d_model)
    query_embed = W_E[plan.query_tok] + W_pos[n_pos - 1]  # (Q, d_model)
    keys = torch.matmul(pair_embed, attn.W_K) + attn.b_K[:, None]  # (H, U, E)
    values = torch.matmul(pair_embed, attn.W_V) + attn.b_V[:, None]
    queries = torch.matmul(query_embed, attn.W_Q) + attn.b_Q[:, None]  # (H, Q, E)
    score_tab = torch.bmm(keys, queries.transpose(1, 2)) / attn.attn_scale  # (H, U, Q)
    scores = score_tab.reshape(len(score_tab), -1).index_select(1, plan.score_index)  # (H, P·B)
    # Softmax over positions with the batch innermost: ~8x faster than over a last dim of P = 3.
    pattern = scores.view(-1, n_pos, n_batch).softmax(dim=1)  # the last query sees every position
    return _Attention(plan, query_embed, values, pattern)


def _resid_mid(model, att: _Attention):
    attn = model.blocks[0].attn
    plan = att.plan
    v = att.values[:, plan.pair_index]  # (H, B, P, E)
    z = (att.pattern.transpose(1, 2).unsqueeze(-1) * v).sum(dim=2)  # (H, B, E)
    x = (att.query_embed + attn.b_O)[plan.query_index]
    return torch.addmm(x, z.transpose(0, 1).reshape(plan.n_examples, -1), attn.W_O.reshape(-1, attn.W_O.shape[-1]))


def single_layer_resid_mid(model, tokens):
    """Residual stream after attention at the last position, (batch, d_model), of a one-layer model.

    The layer input is the embedding, so everything before the MLP comes from tables indexed by
    (position, token); only the attention-weighted sum and ``W_O`` run per example.
    """
    plan = TokenPlan.build(tokens, model.cfg.d_vocab, model.cfg.n_heads)
    return _resid_mid(model, _single_layer_attention(model, plan))


def _single_layer_logits(model, plan: TokenPlan, act):
    """One layer, folded: the MLP pre-activation and the residual stream's logits read from tables.

    With read = [W_in | W_U] (d_model × (d_mlp + p)), ``resid_mid @ read`` is, per example, the sum
    of the row of its last token (embedding + b_O, times read, plus biases) and, for each position
    and head, the attention weight times the row of that (position, token, head): its value times
    W_O[h] times read. So the MLP input and the direct logits are a weighted sum of P·H + 1 table
    rows (13 at P = 3, H = 4) instead of a d_model × (d_mlp + p) product, and the MLP output reaches
    the logits through W_out @ W_U, one d_mlp × p matrix. The tables are built with autograd from
    the HookedTransformer's own parameters, so every gradient reaches them; only the weighted row
    sum has a hand-written backward.
    """
    cfg, attn = model.cfg, model.blocks[0].attn
    W_U, b_U = model.unembed.W_U, model.unembed.b_U
    n_out = W_U.shape[1]
    att = _single_layer_attention(model, plan)
    pad = _padded(n_out) - n_out
    if cfg.attn_only:
        read, bias = W_U, b_U
    else:
        mlp = model.blocks[0].mlp
        read = F.pad(torch.cat([mlp.W_in, W_U], dim=1), (0, pad))
        bias = F.pad(torch.cat([mlp.b_in, mlp.b_out @ W_U + b_U]), (0, pad))
    head_read = torch.einsum("hed,dr->her", attn.W_O, read)  # W_O[h] @ read, (H, E, width)
    value_rows = torch.bmm(att.values, head_read)  # (H, U, width)
    token_rows = torch.addmm(bias, att.query_embed + attn.b_O, read)  # (Q, width)
    rows = torch.cat([value_rows.reshape(-1, read.shape[1]), token_rows])
    # Each example's weights in its rows' order (head, position), then 1 for its last token's row.
    weights = F.pad(att.pattern.permute(2, 0, 1).reshape(plan.n_examples, -1), (0, 1), value=1.0)
    # The hand-written backward serves the CPU; elsewhere autograd composes torch's own ops.
    custom = torch.is_grad_enabled() and rows.device.type == "cpu" and not _COMPOSED_BACKWARD
    if cfg.attn_only:
        return _RowSum.apply(rows, weights, plan) if custom else _row_sum(rows, weights, plan)
    folded = F.pad(model.blocks[0].mlp.W_out @ W_U, (0, pad))  # (d_mlp, padded p)
    if custom:
        return _FoldedLogits.apply(rows, weights, folded, plan, cfg.act_fn)[:, :n_out]
    if not torch.is_grad_enabled():
        return _evaluate_folded(rows, weights, folded, plan, act)[:, :n_out]
    out = _row_sum(rows, weights, plan)
    pre, direct = out[:, : cfg.d_mlp], out[:, cfg.d_mlp :]
    return torch.addmm(direct, act(pre), folded)[:, :n_out]


def _evaluate_folded(rows, weights, folded, plan: TokenPlan, act):
    """``direct + act(pre) @ folded`` with no graph, in blocks (see :func:`_blocks`), the
    activation in place."""
    d_mlp, n = folded.shape[0], plan.n_examples
    logits = torch.empty(n, folded.shape[1], dtype=rows.dtype, device=rows.device)
    for part in _blocks(n, rows.device):
        out = _row_sum(rows, weights[part], plan, part)
        pre = out[:, :d_mlp]
        hidden = pre.relu_() if act is F.relu else act(pre)
        torch.addmm(out[:, d_mlp:], hidden, folded, out=logits[part])
    return logits


def last_position_logits(model, tokens: torch.Tensor, plan: TokenPlan | None = None) -> torch.Tensor:
    """Logits at the last position, (batch, d_vocab_out), equal to ``model(tokens)[:, -1]``.

    ``plan``: the tokens' TokenPlan when the caller keeps one (one-layer models); built if absent.
    """
    cfg = model.cfg
    act = ACTIVATIONS.get(cfg.act_fn) if not cfg.attn_only else None
    blocks = list(model.blocks)
    if len(blocks) == 1:
        plan = plan or TokenPlan.build(tokens, cfg.d_vocab, cfg.n_heads)
        return _single_layer_logits(model, plan, act)

    # Deeper models: earlier layers in full, the last one at the last position only.
    x = model.embed.W_E[tokens] + model.pos_embed.W_pos[: tokens.shape[1]]
    for block in blocks[:-1]:
        a = block.attn
        x = x + _attention(a, _proj(x, a.W_Q, a.b_Q), _proj(x, a.W_K, a.b_K), _proj(x, a.W_V, a.b_V), True)
        if not cfg.attn_only:
            x = x + _mlp(block, x, act)
    attn = blocks[-1].attn
    k, v = _proj(x, attn.W_K, attn.b_K), _proj(x, attn.W_V, attn.b_V)
    x_last = x[:, -1]
    q = _proj(x_last, attn.W_Q, attn.b_Q).unsqueeze(1)

    # The last query attends to every position, so no mask is needed here.
    x_last = x_last + _attention(attn, q, k, v, causal=False)[:, 0]
    if not cfg.attn_only:
        x_last = x_last + _mlp(blocks[-1], x_last, act)
    return x_last @ model.unembed.W_U + model.unembed.b_U


class LeanForward:
    """tokens -> last-position logits on the model's current parameters.

    A run calls it on the same two token tensors (train, test) every epoch, so each tensor's
    TokenPlan is built once and kept with the tensor it describes (token tensors are not changed
    in place between calls).
    """

    def __init__(self, model):
        self.model = model
        self._plans: dict[int, tuple[torch.Tensor, TokenPlan]] = {}

    def _plan(self, tokens: torch.Tensor) -> TokenPlan | None:
        if self.model.cfg.n_layers != 1:
            return None
        kept = self._plans.get(id(tokens))
        if kept is None or kept[0] is not tokens:  # holding the tensor keeps its id from being reused
            if len(self._plans) >= 8:
                self._plans.clear()
            plan = TokenPlan.build(tokens, self.model.cfg.d_vocab, self.model.cfg.n_heads)
            kept = self._plans[id(tokens)] = (tokens, plan)
        return kept[1]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        return last_position_logits(self.model, tokens, self._plan(tokens))


def forward_fn(model, implementation: str):
    """The callable training uses: tokens -> last-position logits."""
    if implementation == "lean" and unsupported_reason(model.cfg) is None:
        return LeanForward(model)
    return lambda tokens: model(tokens)[:, -1]
