"""A lean forward pass: the same function as HookedTransformer's last-position logits, cheaper.

Training only ever uses the logits at the last position. HookedTransformer computes attention
output, MLP and unembedding at every position; here they are computed at the last position only,
on the very same parameters (the HookedTransformer remains the model of record: same state dict,
same optimizer, same checkpoints). With one layer the layer input is the embedding alone, so
keys, values and the query come from per-token tables, ``(W_E + W_pos[pos]) @ W``, of 3·(p+1)
rows instead of one row per example and position. Deeper models run their earlier layers in full.

Checked against HookedTransformer in the tests (logits agree to float32 rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}


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


def single_layer_resid_mid(model, tokens):
    """Residual stream after attention at the last position, (batch, d_model), of a one-layer model.

    The layer input is the embedding, so everything before the MLP comes from tables indexed by
    (position, token); only the attention-weighted sum and ``W_O`` run per example.
    """
    cfg, attn = model.cfg, model.blocks[0].attn
    W_E, W_pos = model.embed.W_E, model.pos_embed.W_pos
    n_batch, n_pos = tokens.shape
    n_vocab, n_heads, d_head = W_E.shape[0], cfg.n_heads, cfg.d_head
    table = W_E.unsqueeze(0) + W_pos[:n_pos, None, :]  # (P, V, d): embedding of token v at position p
    flat = table.reshape(n_pos * n_vocab, -1)
    k_tab = (flat @ _heads_matrix(attn.W_K)).view(n_pos, n_vocab, n_heads, d_head) + attn.b_K
    v_tab = (flat @ _heads_matrix(attn.W_V)).view(n_pos * n_vocab, n_heads, d_head) + attn.b_V
    q_tab = (table[-1] @ _heads_matrix(attn.W_Q)).view(n_vocab, n_heads, d_head) + attn.b_Q
    # Score of key (position p, token k) for the last position's query token q, per head.
    score_tab = torch.einsum("pkhe,qhe->pkqh", k_tab, q_tab) / attn.attn_scale  # (P, V, V, H)
    positions = torch.arange(n_pos, device=tokens.device)
    key_rows = positions * n_vocab + tokens  # (B, P): row of each (position, token) in the tables
    score_rows = key_rows * n_vocab + tokens[:, -1:]
    scores = F.embedding(score_rows, score_tab.reshape(-1, n_heads))  # (B, P, H)
    pattern = scores.softmax(dim=1)  # the last query attends to every position: no mask
    v = F.embedding(key_rows, v_tab.reshape(n_pos * n_vocab, -1)).view(n_batch, n_pos, n_heads, d_head)
    z = (pattern.unsqueeze(-1) * v).sum(dim=1)  # (B, H, E)
    x = F.embedding(tokens[:, -1], table[-1]) + attn.b_O
    return torch.addmm(x, z.reshape(n_batch, -1), attn.W_O.reshape(-1, attn.W_O.shape[-1]))


def _single_layer_logits(model, tokens, act):
    """One layer: attention from tables, then only the MLP and unembedding run per example."""
    x = single_layer_resid_mid(model, tokens)
    if not model.cfg.attn_only:
        x = x + _mlp(model.blocks[0], x, act)
    return torch.addmm(model.unembed.b_U, x, model.unembed.W_U)


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
