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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import LEAN_ACT_FNS

ACTIVATIONS = {name: getattr(F, name) for name in LEAN_ACT_FNS}  # torch.nn.functional.relu, ...


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


@dataclass
class _Attention:
    """The last query's attention in a one-layer model, from per-(position, token) tables."""

    table: torch.Tensor  # (P, V, d_model): embedding of token v at position p
    v_tab: torch.Tensor  # (P·V, H, E): value of each (position, token) per head
    key_rows: torch.Tensor  # (B, P): row of each example's (position, token) in the tables
    pattern: torch.Tensor  # (B, P, H): the last query's attention over positions


def _single_layer_attention(model, tokens) -> _Attention:
    cfg, attn = model.cfg, model.blocks[0].attn
    W_E, W_pos = model.embed.W_E, model.pos_embed.W_pos
    n_pos = tokens.shape[1]
    n_vocab, n_heads, d_head = W_E.shape[0], cfg.n_heads, cfg.d_head
    table = W_E.unsqueeze(0) + W_pos[:n_pos, None, :]
    flat = table.reshape(n_pos * n_vocab, -1)
    k_tab = (flat @ _heads_matrix(attn.W_K)).view(n_pos, n_vocab, n_heads, d_head) + attn.b_K
    v_tab = (flat @ _heads_matrix(attn.W_V)).view(n_pos * n_vocab, n_heads, d_head) + attn.b_V
    q_tab = (table[-1] @ _heads_matrix(attn.W_Q)).view(n_vocab, n_heads, d_head) + attn.b_Q
    # Score of key (position p, token k) for the last position's query token q, per head.
    score_tab = torch.einsum("pkhe,qhe->pkqh", k_tab, q_tab) / attn.attn_scale  # (P, V, V, H)
    positions = torch.arange(n_pos, device=tokens.device)
    key_rows = positions * n_vocab + tokens
    scores = F.embedding(key_rows * n_vocab + tokens[:, -1:], score_tab.reshape(-1, n_heads))  # (B, P, H)
    return _Attention(table, v_tab, key_rows, scores.softmax(dim=1))  # the last query sees every position


def _resid_mid(model, att: _Attention, tokens):
    attn = model.blocks[0].attn
    n_batch, n_pos = att.key_rows.shape
    v = F.embedding(att.key_rows, att.v_tab.reshape(att.v_tab.shape[0], -1)).view(n_batch, n_pos, *att.v_tab.shape[1:])
    z = (att.pattern.unsqueeze(-1) * v).sum(dim=1)  # (B, H, E)
    x = F.embedding(tokens[:, -1], att.table[-1]) + attn.b_O
    return torch.addmm(x, z.reshape(n_batch, -1), attn.W_O.reshape(-1, attn.W_O.shape[-1]))


def single_layer_resid_mid(model, tokens):
    """Residual stream after attention at the last position, (batch, d_model), of a one-layer model.

    The layer input is the embedding, so everything before the MLP comes from tables indexed by
    (position, token); only the attention-weighted sum and ``W_O`` run per example.
    """
    return _resid_mid(model, _single_layer_attention(model, tokens), tokens)


class _TableLinear(torch.autograd.Function):
    """``x @ weight + bias`` whose forward value is read from tables (a weighted sum of a few rows
    per example, prepared by the caller) and whose backward is the ordinary linear one, so the
    gradients reach ``x``, ``weight`` and ``bias`` (and through them the real parameters)."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, index, weights):
        ctx.save_for_backward(x, weight)
        return F.embedding_bag(index, rows, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight.T if ctx.needs_input_grad[0] else None
        grad_weight = x.T @ grad if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(dim=0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


def _single_layer_logits(model, tokens, act):
    """One layer, folded: the MLP pre-activation and the residual stream's logits read from tables.

    With read = [W_in | W_U] (d_model × (d_mlp + p)), ``resid_mid @ read`` is, per example, the sum
    of the row of its last token (embedding + b_O, times read, plus biases) and, for each position
    and head, the attention weight times the row of that (position, token, head): its value times
    W_O[h] times read. So the MLP input and the direct logits are a weighted sum of P·H + 1 table rows
    (13 at P = 3, H = 4) instead of a d_model × (d_mlp + p) product, and the MLP output reaches the
    logits through W_out @ W_U, one d_mlp × p matrix. The backward of that sum is the ordinary linear
    one on resid_mid (the HookedTransformer's own parameters get every gradient).
    """
    if model.cfg.attn_only:
        return torch.addmm(model.unembed.b_U, single_layer_resid_mid(model, tokens), model.unembed.W_U)
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    W_U = model.unembed.W_U
    att = _single_layer_attention(model, tokens)
    read = torch.cat([mlp.W_in, W_U], dim=1)
    bias = torch.cat([mlp.b_in, mlp.b_out @ W_U + model.unembed.b_U])
    n_batch, n_pos = att.key_rows.shape
    n_heads = att.v_tab.shape[1]
    with torch.no_grad():
        head_read = torch.einsum("hed,dr->her", attn.W_O, read)  # W_O[h] @ read
        value_rows = torch.einsum("nhe,her->nhr", att.v_tab, head_read).reshape(-1, read.shape[1])
        token_rows = torch.addmm(bias, att.table[-1] + attn.b_O, read)
        rows = torch.cat([value_rows, token_rows])
        heads = torch.arange(n_heads, device=tokens.device)
        index = torch.cat(
            [(att.key_rows[:, :, None] * n_heads + heads).reshape(n_batch, -1), value_rows.shape[0] + tokens[:, -1:]],
            dim=1,
        )
        weights = torch.cat([att.pattern.detach().reshape(n_batch, -1), att.pattern.new_ones(n_batch, 1)], dim=1)
    if torch.is_grad_enabled():
        out = _TableLinear.apply(_resid_mid(model, att, tokens), read, bias, rows, index, weights)
    else:  # evaluation: no backward, so resid_mid itself is never needed
        out = F.embedding_bag(index, rows, per_sample_weights=weights, mode="sum")
    pre, direct_logits = out.split([mlp.W_in.shape[1], W_U.shape[1]], dim=1)
    return torch.addmm(direct_logits, act(pre), mlp.W_out @ W_U)


def last_position_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits at the last position, (batch, d_vocab_out), equal to ``model(tokens)[:, -1]``."""
    cfg = model.cfg
    act = ACTIVATIONS.get(cfg.act_fn) if not cfg.attn_only else None
    blocks = list(model.blocks)
    if len(blocks) == 1:
        return _single_layer_logits(model, tokens, act)

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


def forward_fn(model, implementation: str):
    """The callable training uses: tokens -> last-position logits."""
    if implementation == "lean" and unsupported_reason(model.cfg) is None:
        return lambda tokens: last_position_logits(model, tokens)
    return lambda tokens: model(tokens)[:, -1]
