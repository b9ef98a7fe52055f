"""The folded one-layer forward: HookedTransformer's last-position logits from small tables.

With one layer the layer input is the embedding alone, so keys, values and queries are functions of
(position, token) and everything before the MLP comes from tables. With read = [W_in | W_U]
(d_model × (d_mlp + p)), ``resid_mid @ read`` is, per example, the row of its last token
(embedding + b_O, times read, plus biases) plus, for each head and position, the attention weight
times the row of that (head, position, token): its value times W_O[h] times read. So the MLP input
and the direct logits are a weighted sum of K table rows, and the MLP output reaches the logits
through folded = W_out @ W_U, one d_mlp × p matrix. K = H·P + 1 in general; when every example ends
in the same token (modular addition's "="), each head's weights sum to 1, so that token's value
rows join the token row and the others hold their difference from it: K = H·(P − 1) + 1.

The tables are built from the HookedTransformer's own parameters (it stays the model of record:
same state dict, optimizer, checkpoints), so every gradient reaches them; the weighted row sum and
the MLP have one hand-written backward (:class:`_FoldedLogits`) whose cost scales with the table
rows, not with the batch, and so do the tables' build (:class:`_AttentionTables`, :class:`_Fold`;
on other devices autograd composes torch's own operations).

Multiply-accumulates per example (P = 3 positions, H heads of E dims, d = d_model, m = d_mlp,
p' = p padded to a multiple of 16, W = m + p'; the demo: H = 4, E = 32, d = 128, m = 512, p = 113,
p' = 128, K = 9, W = 640) and per table build (U (position, token) pairs occur, 227 at p = 113, of
which U_v = 226 have value rows):

========================  ================================  =========================
                          terms                             the demo
========================  ================================  =========================
forward, per example      K·W + m·p'                        71.3 K
backward, per example     2·m·p' + 2·K·W                    142.6 K
tables, forward           U_v·H·E·W + H·E·d·W + 2·U·d·H·E   44 M (once per update)
                          + m·d·p
tables, backward          twice the forward                 88 M
========================  ================================  =========================

An epoch at p = 113, 30 % train (3,830 examples trained, 8,939 evaluated) is 1.59 G MACs (3.2
GFLOP): the tables are built once per parameter update and shared by the evaluation and the next
training step (:class:`grokpipe.training.lean_forward.LeanForward`). HookedTransformer, which computes all
three positions, does 13.0 G (636 K per example forward, twice that backward).
bench/bench_training.py prints the floor this gives at the matrix-product rate of the machine it
runs on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import LEAN_ACT_FNS
from .cross_entropy import cross_entropy_and_correct

ACTIVATIONS = {name: getattr(F, name) for name in LEAN_ACT_FNS}  # torch.nn.functional.relu, ...
COMPOSED_BACKWARD = False  # tests set it to check, on the CPU, the backward other devices take
BLOCK = 1024  # examples per block when evaluating on the CPU (see _evaluate)


def padded(n: int) -> int:
    """Width of the logit columns in the table rows and folded products: a multiple of 16 floats
    (64 bytes). At p = 113 an epoch is ~8 % faster than with 113 columns (in-process A/B): the rows
    (640 floats) stay aligned for the row sums, and MKL multiplies 128 columns in the time of 113."""
    return -(-n // 16) * 16


@dataclass(frozen=True)
class TableLayout:
    """Which (position, token) pairs and last tokens the tables hold: those that occur in the
    token tensors it covers (at p = 113: 227 pairs and one last token, "=")."""

    n_vocab: int
    n_heads: int
    n_pos: int  # tokens per example; the query is the last
    pair_ids: torch.Tensor  # (U,), sorted: position * n_vocab + token
    query_tok: torch.Tensor  # (Q,), sorted

    @classmethod
    def covering(cls, token_sets, n_vocab: int, n_heads: int) -> TableLayout:
        (n_pos,) = {tokens.shape[1] for tokens in token_sets}
        pairs = [_pair_ids(tokens, n_vocab).reshape(-1) for tokens in token_sets]
        queries = [tokens[:, -1] for tokens in token_sets]
        return cls(n_vocab, n_heads, n_pos, torch.unique(torch.cat(pairs)), torch.unique(torch.cat(queries)))

    @property
    def shared_last(self) -> bool:
        """Whether every example ends with the same token (modular addition's "="). Its attention
        weight is then 1 minus the others', so its value rows fold into the token row and each
        example weighs one position fewer per head (:func:`build_tables`)."""
        return len(self.query_tok) == 1

    @property
    def n_weighted(self) -> int:
        """Positions whose value rows each example weighs by its attention, per head."""
        return self.n_pos - 1 if self.shared_last else self.n_pos

    @property
    def n_value_pairs(self) -> int:
        """Pairs with value rows: all but the shared last one (the last in order) when there is one."""
        return len(self.pair_ids) - 1 if self.shared_last else len(self.pair_ids)

    @property
    def n_rows(self) -> int:
        """(head, pair) value rows, head-major, then one row per last token."""
        return self.n_heads * self.n_value_pairs + len(self.query_tok)


def _pair_ids(tokens: torch.Tensor, n_vocab: int) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device) * n_vocab + tokens


@dataclass(frozen=True)
class TokenPlan:
    """Where each example's rows sit in the tables of ``layout``; depends only on the tokens, so a
    run builds it once per token tensor.

    The examples are processed in the lexicographic order of their tokens (``order``), and logits
    return to the order of the tokens given (``inverse``; a loss takes the labels to theirs).
    Consecutive examples then share their first position's rows, and the rows of the others are
    read in ascending order, so the row sums find the 2.3 MB of tables in cache (an epoch at
    p = 113 -6 % on an Intel Xeon with 2 MB of L2 per core, in-process A/B; the row sums alone -25
    to -40 % with cold caches)."""

    layout: TableLayout
    n_examples: int
    order: torch.Tensor  # (B,): the example each processed position holds
    inverse: torch.Tensor  # (B,): the processed position of each example
    pair_index: torch.Tensor  # (B, P): each example's pairs
    query_index: torch.Tensor  # (B,): its last token
    score_index: torch.Tensor  # (P·B,): column of the (H, U·Q) score table, position-major
    row_index: torch.Tensor  # (B, K): its value rows (h·U_v + pair), then its last token's row
    # row_index read the other way, one bag of entries per row, the bags pair-major (see
    # _row_sum_backward): each bag's first entry, the bags' examples, their entries, each row's bag
    by_row: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

    @classmethod
    def build(cls, tokens: torch.Tensor, layout: TableLayout) -> TokenPlan:
        if tokens.shape[1] != layout.n_pos:
            raise ValueError(f"tokens have {tokens.shape[1]} positions, the table layout {layout.n_pos}")
        n_batch = len(tokens)
        example_order = torch.arange(n_batch, device=tokens.device)
        for position in reversed(range(tokens.shape[1])):  # stable sorts, last key first: lexicographic
            example_order = example_order[torch.argsort(tokens[example_order, position], stable=True)]
        inverse = torch.empty_like(example_order)
        inverse[example_order] = torch.arange(n_batch, device=tokens.device)
        tokens = tokens[example_order]
        ids = _pair_ids(tokens, layout.n_vocab)
        pair_index = torch.searchsorted(layout.pair_ids, ids)
        query_index = torch.searchsorted(layout.query_tok, tokens[:, -1].contiguous())
        n_pairs = len(layout.pair_ids)
        if (pair_index >= n_pairs).any() or (layout.pair_ids[pair_index.clamp(max=n_pairs - 1)] != ids).any():
            raise ValueError("tokens hold (position, token) pairs the table layout does not cover")
        heads = torch.arange(layout.n_heads, device=tokens.device)
        n_value = layout.n_value_pairs
        # Ascending within each example (pairs are sorted by position first): a valid CSR row.
        value_rows = (heads[:, None] * n_value + pair_index[:, None, : layout.n_weighted]).reshape(n_batch, -1)
        row_index = torch.cat([value_rows, layout.n_heads * n_value + query_index[:, None]], dim=1)
        # Each row's bag: value rows pair-major (a pair's heads adjacent), then the last tokens'.
        bag_of_row = torch.arange(layout.n_rows, device=tokens.device)
        n_value_rows = layout.n_heads * n_value
        bag_of_row[:n_value_rows] = bag_of_row[:n_value_rows].view(n_value, layout.n_heads).T.reshape(-1)
        bags = bag_of_row[row_index.reshape(-1)]
        order = torch.argsort(bags, stable=True)
        starts = torch.zeros(layout.n_rows, dtype=torch.int64, device=tokens.device)
        starts[1:] = torch.bincount(bags, minlength=layout.n_rows).cumsum(0)[:-1]
        return cls(
            layout=layout,
            n_examples=n_batch,
            order=example_order,
            inverse=inverse,
            pair_index=pair_index,
            query_index=query_index,
            score_index=(pair_index * len(layout.query_tok) + query_index[:, None]).T.reshape(-1),
            row_index=row_index,
            by_row=(starts, order // row_index.shape[1], order, bag_of_row),
        )


@dataclass
class Tables:
    """What the folded forward reads, as functions of the parameters only (head-major, so the
    per-head products are batched products over contiguous blocks)."""

    query_embed: torch.Tensor  # (Q, d_model): embedding + position of each last token
    values: torch.Tensor  # (H, U, E): value of each pair per head
    score_tab: torch.Tensor  # (H, U·Q): attention score of each pair's key for each last token
    rows: torch.Tensor | None = None  # (n_rows, W): [MLP input | direct logits] per table row
    folded: torch.Tensor | None = None  # (d_mlp, p'): W_out @ W_U, zero-padded


def _hand_written_backward(device: torch.device) -> bool:
    """Whether training takes the hand-written backwards: on the CPU (elsewhere autograd composes
    torch's own operations), with a graph."""
    return torch.is_grad_enabled() and device.type == "cpu" and not COMPOSED_BACKWARD


def attention_tables(model, layout: TableLayout) -> Tables:
    """Embeddings, values and attention scores of every pair and last token of ``layout``."""
    attn = model.blocks[0].attn
    params = (model.embed.W_E, model.pos_embed.W_pos, attn.W_Q, attn.b_Q, attn.W_K, attn.b_K, attn.W_V, attn.b_V)
    if _hand_written_backward(attn.W_K.device):
        return Tables(*_AttentionTables.apply(layout, float(attn.attn_scale), *params))
    _, query_embed, _, values, _, score_tab = _attention_forward(layout, float(attn.attn_scale), *params)
    return Tables(query_embed, values, score_tab.view(len(score_tab), -1))


def _attention_forward(layout: TableLayout, scale: float, W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V):
    """(pair embeddings, last-token embeddings, keys, values, queries, scores (H, U, Q)); the keys,
    values and queries of all heads as one product each."""
    n_heads, d_model, head_dim = W_K.shape
    pair_embed = W_E[layout.pair_ids % layout.n_vocab] + W_pos[layout.pair_ids // layout.n_vocab]  # (U, d)
    query_embed = W_E[layout.query_tok] + W_pos[layout.n_pos - 1]  # (Q, d_model)

    def heads(x, W, b):  # (N, d_model) -> (H, N, E)
        flat = x @ W.transpose(0, 1).reshape(d_model, -1)  # (N, H·E)
        return flat.view(len(x), n_heads, head_dim).transpose(0, 1) + b[:, None]

    keys, values, queries = heads(pair_embed, W_K, b_K), heads(pair_embed, W_V, b_V), heads(query_embed, W_Q, b_Q)
    score_tab = torch.bmm(keys, queries.transpose(1, 2)) / scale  # (H, U, Q)
    return pair_embed, query_embed, keys, values.contiguous(), queries, score_tab


def build_tables(model, layout: TableLayout) -> Tables:
    """:func:`attention_tables` plus the folded rows and, with an MLP, ``W_out @ W_U``."""
    cfg, attn = model.cfg, model.blocks[0].attn
    tables = attention_tables(model, layout)
    W_U, b_U = model.unembed.W_U, model.unembed.b_U
    if not cfg.attn_only and _hand_written_backward(W_U.device):
        mlp = model.blocks[0].mlp
        params = (attn.W_O, attn.b_O, mlp.W_in, mlp.b_in, mlp.W_out, mlp.b_out, W_U, b_U)
        tables.rows, tables.folded = _Fold.apply(tables.values, tables.query_embed, layout.shared_last, *params)
        return tables
    if cfg.attn_only:
        read, bias = W_U, b_U
    else:
        mlp = model.blocks[0].mlp
        read, bias, tables.folded = _mlp_read(mlp.W_in, mlp.b_in, mlp.W_out, mlp.b_out, W_U, b_U)
    tables.rows = _fold_rows(tables.values, tables.query_embed, layout.shared_last, attn.W_O, attn.b_O, read, bias)[0]
    return tables


def _mlp_read(W_in, b_in, W_out, b_out, W_U, b_U):
    """(read, bias, folded) of a model with an MLP: read = [W_in | W_U] and the token rows' bias
    [b_in | b_out @ W_U + b_U], zero-padded to ``padded(p)`` logit columns, and W_out @ W_U."""
    pad = padded(W_U.shape[1]) - W_U.shape[1]
    read = F.pad(torch.cat([W_in, W_U], dim=1), (0, pad))  # (d_model, W)
    bias = F.pad(torch.cat([b_in, b_out @ W_U + b_U]), (0, pad))
    return read, bias, F.pad(W_out @ W_U, (0, pad))


def _fold_rows(values, query_embed, shared_last, W_O, b_O, read, bias, in_place=False):
    """The table rows, value rows (head-major) then one row per last token, each read through
    ``read``: (rows, head_read, resid, value_part, last). ``in_place`` (no graph): the products
    write straight into one new tensor; otherwise the rows are concatenated (autograd records
    that, not ``out=``)."""
    n_heads, head_dim, d_model = W_O.shape
    width = read.shape[1]
    head_read = (W_O.reshape(-1, d_model) @ read).view(n_heads, head_dim, width)  # W_O[h] @ read
    resid = query_embed + b_O
    # sum_p w_p·v_p = v_last + sum_{p < last} w_p·(v_p − v_last), the weights summing to 1: the last
    # pair's rows join the token rows and the others hold their difference from it.
    last = values[:, -1] if shared_last else None  # (H, E)
    value_part = values[:, :-1] - last[:, None] if shared_last else values
    n_value_rows = n_heads * value_part.shape[1]
    if in_place:
        rows = torch.empty(n_value_rows + len(resid), width, dtype=read.dtype, device=read.device)
        torch.bmm(value_part, head_read, out=rows[:n_value_rows].view(n_heads, -1, width))
        token_rows = torch.addmm(bias, resid, read, out=rows[n_value_rows:])
    else:
        value_rows = torch.bmm(value_part, head_read).reshape(n_value_rows, width)
        token_rows = torch.addmm(bias, resid, read)  # (Q, W)
    if shared_last:
        token_rows += last.reshape(1, -1) @ head_read.view(-1, width)
    if not in_place:
        rows = torch.cat([value_rows, token_rows])
    return rows, head_read, resid, value_part, last


class _AttentionTables(torch.autograd.Function):
    """:func:`_attention_forward` with one hand-written backward: no broadcast products or graph
    node per operation."""

    @staticmethod
    def forward(ctx, layout: TableLayout, scale: float, W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V):
        out = _attention_forward(layout, scale, W_E, W_pos, W_Q, b_Q, W_K, b_K, W_V, b_V)
        pair_embed, query_embed, keys, values, queries, score_tab = out
        ctx.save_for_backward(pair_embed, query_embed, keys, queries, W_Q, W_K, W_V)
        ctx.layout, ctx.scale, ctx.n_vocab, ctx.n_ctx = layout, scale, len(W_E), len(W_pos)
        return query_embed, values, score_tab.view(len(score_tab), -1)

    @staticmethod
    def backward(ctx, grad_query_embed, grad_values, grad_scores):
        pair_embed, query_embed, keys, queries, W_Q, W_K, W_V = ctx.saved_tensors
        n_heads, d_model, head_dim = W_K.shape
        layout = ctx.layout
        tok, pos = layout.pair_ids % layout.n_vocab, layout.pair_ids // layout.n_vocab
        grad_scores = grad_scores.view(n_heads, len(pair_embed), -1) / ctx.scale  # (H, U, Q)
        grad_keys = torch.bmm(grad_scores, queries)  # (H, U, E)
        grad_queries = torch.bmm(grad_scores.transpose(1, 2), keys)  # (H, Q, E)
        grad_pair = torch.zeros_like(pair_embed)
        grad_query = grad_query_embed.clone()  # autograd gives unused outputs zero gradients, never None
        grads = []
        for x, grad_x, grad_heads, W in (
            (query_embed, grad_query, grad_queries, W_Q),
            (pair_embed, grad_pair, grad_keys, W_K),
            (pair_embed, grad_pair, grad_values, W_V),
        ):
            flat = grad_heads.transpose(0, 1).reshape(len(x), -1)  # (N, H·E)
            grad_x.addmm_(flat, W.transpose(0, 1).reshape(d_model, -1).T)
            grads += [(x.T @ flat).view(d_model, n_heads, head_dim).transpose(0, 1), grad_heads.sum(1)]
        grad_W_E = torch.zeros(ctx.n_vocab, d_model, dtype=pair_embed.dtype, device=pair_embed.device)
        grad_W_E.index_add_(0, tok, grad_pair).index_add_(0, layout.query_tok, grad_query)
        grad_W_pos = torch.zeros(ctx.n_ctx, d_model, dtype=pair_embed.dtype, device=pair_embed.device)
        grad_W_pos.index_add_(0, pos, grad_pair)[layout.n_pos - 1] += grad_query.sum(0)
        return None, None, grad_W_E, grad_W_pos, *grads


class _Fold(torch.autograd.Function):
    """:func:`build_tables`' rows and ``folded`` of a model with an MLP (the same :func:`_mlp_read`
    and :func:`_fold_rows` as its composed path, the rows written in place), with one hand-written
    backward: the same products autograd runs, without its zero-filled slice gradients, padding
    and concatenation copies, or one graph node per operation (the tables' build and backward
    are a few dozen small operations each epoch)."""

    @staticmethod
    def forward(ctx, values, query_embed, shared_last, W_O, b_O, W_in, b_in, W_out, b_out, W_U, b_U):
        read, bias, folded = _mlp_read(W_in, b_in, W_out, b_out, W_U, b_U)
        rows, head_read, resid, value_part, last = _fold_rows(
            values, query_embed, shared_last, W_O, b_O, read, bias, in_place=True
        )
        W_O_flat = W_O.reshape(-1, W_O.shape[-1])
        ctx.save_for_backward(value_part, last, resid, read, head_read, W_O_flat, W_out, W_U, b_out)
        ctx.shared_last, ctx.d_mlp = shared_last, W_in.shape[1]
        return rows, folded

    @staticmethod
    def backward(ctx, grad_rows, grad_folded):
        value_part, last, resid, read, head_read, W_O_flat, W_out, W_U, b_out = ctx.saved_tensors
        n_heads, n_value, head_dim = value_part.shape
        d_mlp, n_out, width = ctx.d_mlp, W_U.shape[1], read.shape[1]
        grad_value_rows = grad_rows[: n_heads * n_value].view(n_heads, n_value, width)
        grad_token_rows = grad_rows[n_heads * n_value :]
        grad_values = torch.bmm(grad_value_rows, head_read.transpose(1, 2))  # (H, U_v, E)
        grad_head_read = torch.bmm(value_part.transpose(1, 2), grad_value_rows).view(-1, width)  # (H·E, W)
        grad_bias = grad_token_rows.sum(0)
        if ctx.shared_last:
            # v_last feeds the token rows (once per last token) and every value row (negated).
            grad_last = (head_read.view(-1, width) @ grad_bias).view(n_heads, head_dim) - grad_values.sum(1)
            grad_head_read.addr_(last.reshape(-1), grad_bias)
            grad_values = torch.cat([grad_values, grad_last[:, None]], dim=1)
        grad_resid = grad_token_rows @ read.T
        grad_read = torch.addmm(resid.T @ grad_token_rows, W_O_flat.T, grad_head_read)  # (d_model, W)
        grad_W_O = (grad_head_read @ read.T).view(n_heads, head_dim, -1)
        grad_bias_U = grad_bias[d_mlp : d_mlp + n_out]
        grad_folded = grad_folded[:, :n_out]
        grad_W_U = grad_read[:, d_mlp : d_mlp + n_out] + torch.outer(b_out, grad_bias_U) + W_out.T @ grad_folded
        return (
            grad_values,
            grad_resid,  # query_embed's
            None,
            grad_W_O,
            grad_resid.sum(0),  # b_O's
            grad_read[:, :d_mlp].contiguous(),
            grad_bias[:d_mlp],
            grad_folded @ W_U.T,  # W_out's
            W_U @ grad_bias_U,  # b_out's
            grad_W_U,
            grad_bias_U,
        )


def attention_pattern(tables: Tables, plan: TokenPlan) -> torch.Tensor:
    """(H, P, B): the last query's attention over positions (it sees every position)."""
    n_batch, n_pos = plan.pair_index.shape
    scores = tables.score_tab.index_select(1, plan.score_index)  # (H, P·B)
    # Softmax over positions with the batch innermost: ~8x faster than over a last dim of P = 3.
    return scores.view(-1, n_pos, n_batch).softmax(dim=1)


def resid_mid(model, tables: Tables, plan: TokenPlan) -> torch.Tensor:
    """Residual stream after attention at the last position, (B, d_model), in the tokens' order."""
    attn = model.blocks[0].attn
    pattern = attention_pattern(tables, plan)
    v = tables.values[:, plan.pair_index]  # (H, B, P, E)
    z = (pattern.transpose(1, 2).unsqueeze(-1) * v).sum(dim=2)  # (H, B, E)
    x = (tables.query_embed + attn.b_O)[plan.query_index]
    out = torch.addmm(x, z.transpose(0, 1).reshape(plan.n_examples, -1), attn.W_O.reshape(-1, attn.W_O.shape[-1]))
    return out.index_select(0, plan.inverse)


def single_layer_resid_mid(model, tokens: torch.Tensor) -> torch.Tensor:
    """Residual stream after attention at the last position, (batch, d_model), of a one-layer
    model: only the attention-weighted sum and ``W_O`` run per example."""
    layout = TableLayout.covering([tokens], model.cfg.d_vocab, model.cfg.n_heads)
    return resid_mid(model, attention_tables(model, layout), TokenPlan.build(tokens, layout))


def logits(model, tables: Tables, plan: TokenPlan) -> torch.Tensor:
    """Last-position logits, (B, d_vocab_out), in the tokens' order, from tables made by
    :func:`build_tables`."""
    return _plan_logits(model, tables, plan).index_select(0, plan.inverse)


def loss(model, tables: Tables, plan: TokenPlan, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lean loss (:func:`grokpipe.training.cross_entropy.cross_entropy`) of the last-position
    logits against ``labels`` (in the tokens' order), from tables made by :func:`build_tables`, and
    the number of examples classified correctly.
    The labels follow the logits into the plan's order instead of the logits returning to the
    tokens' (a mean does not depend on the order): no copy back of the logits, nor of their
    gradient, and evaluation blocks write their logits in place (an epoch at p = 113 -4 %, in-process
    A/B)."""
    return cross_entropy_and_correct(_plan_logits(model, tables, plan), labels.index_select(0, plan.order))


def _plan_logits(model, tables: Tables, plan: TokenPlan) -> torch.Tensor:
    """Last-position logits, (B, d_vocab_out), in the plan's order."""
    cfg = model.cfg
    n_out = model.unembed.W_U.shape[1]
    pattern = attention_pattern(tables, plan)
    # Each example's weights in its rows' order (head, position), then 1 for its last token's row.
    weighted = pattern[:, : plan.layout.n_weighted]
    weights = F.pad(weighted.permute(2, 0, 1).reshape(plan.n_examples, -1), (0, 1), value=1.0)
    rows, folded = tables.rows, tables.folded
    custom = _hand_written_backward(rows.device)
    if cfg.attn_only:
        return row_sum(rows, weights, plan)
    if custom:
        return _FoldedLogits.apply(rows, weights, folded, plan, cfg.act_fn)[:, :n_out]
    if not torch.is_grad_enabled():
        return _evaluate(rows, weights, folded, plan, cfg.act_fn)[:, :n_out]
    out = _row_sum(rows, weights, plan)
    return torch.addmm(out[:, cfg.d_mlp :], ACTIVATIONS[cfg.act_fn](out[:, : cfg.d_mlp]), folded)[:, :n_out]


def row_sum(rows, weights, plan: TokenPlan):
    """``out[b] = sum_j weights[b, j] * rows[row_index[b, j]]`` in the plan's order, differentiable:
    on the CPU with :func:`_row_sum_backward` (its work scales with the rows, and each row's gradient
    is summed in the same order however many examples the plan holds), elsewhere torch's own."""
    if _hand_written_backward(rows.device):
        return _RowSum.apply(rows, weights, plan)
    return _row_sum(rows, weights, plan)


def _row_sum(rows, weights, plan: TokenPlan, part: slice = slice(None)):
    """``out[b] = sum_j weights[b, j] * rows[row_index[b, j]]``, for the examples in ``part``
    (``weights`` are theirs), in the plan's order."""
    return F.embedding_bag(plan.row_index[part], rows, per_sample_weights=weights, mode="sum")


def _row_sum_backward(grad, rows, weights, plan: TokenPlan):
    """Gradients of :func:`_row_sum` for rows and weights, in work that scales with the rows.

    The rows' gradient is the same weighted sum read the other way (one bag of examples per row,
    again an embedding_bag); the weights' gradient is the dot products at the (example, row) pairs
    only (an SDDMM). torch's own embedding_bag backward does this several times slower on the CPU.
    A pair's rows for the H heads are read by the same examples, so their bags run one after
    another (pair-major) and those examples' gradients are still in cache for the next head: with
    head-major bags the second position's examples, spread over the batch, were read from memory
    once per head (an epoch at p = 113 -3 to -5 %, in-process A/B; the embedding_bag alone -35 %).
    """
    starts, examples, order, bag_of_row = plan.by_row
    grad_bags = F.embedding_bag(examples, grad, starts, mode="sum", per_sample_weights=weights.reshape(-1)[order])
    grad_rows = grad_bags.index_select(0, bag_of_row)
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
    """:func:`_row_sum` with :func:`_row_sum_backward` (attention-only models)."""

    @staticmethod
    def forward(ctx, rows, weights, plan: TokenPlan):
        ctx.save_for_backward(rows, weights)
        ctx.plan = plan
        return _row_sum(rows, weights, plan)

    @staticmethod
    def backward(ctx, grad):
        rows, weights = ctx.saved_tensors
        return *_row_sum_backward(grad.contiguous(), rows, weights, ctx.plan), None


def _activate(pre: torch.Tensor, act_fn: str) -> torch.Tensor:
    """The activation of ``pre`` outside autograd; relu overwrites ``pre`` (its backward needs only
    the output)."""
    return pre.relu_() if act_fn == "relu" else ACTIVATIONS[act_fn](pre)


_aten = torch.ops.aten
_ACT_BACKWARD = {  # (grad at the output, act's input, act's output) -> gradient at the input, in place of grad
    "relu": lambda grad, pre, hidden: _aten.threshold_backward.grad_input(grad, hidden, 0, grad_input=grad),
    "gelu": lambda grad, pre, hidden: _aten.gelu_backward.grad_input(grad, pre, grad_input=grad),
    "silu": lambda grad, pre, hidden: _aten.silu_backward.grad_input(grad, pre, grad_input=grad),
}


class _FoldedLogits(torch.autograd.Function):
    """``logits = direct + act(pre) @ folded`` where ``out = row_sum(rows, weights)`` holds
    [pre | direct] per example, with one hand-written backward.

    One function, so the activation runs in place and the gradient of ``out`` is assembled in one
    buffer (autograd would zero-fill and add a full-size gradient for each of the column slices).
    The logits are in the plan's order.
    """

    @staticmethod
    def forward(ctx, rows, weights, folded, plan: TokenPlan, act_fn: str):
        out = _row_sum(rows, weights, plan)
        d_mlp = folded.shape[0]
        pre, direct = out[:, :d_mlp], out[:, d_mlp:]
        hidden = _activate(pre, act_fn)
        ctx.save_for_backward(rows, weights, folded, None if act_fn == "relu" else pre, hidden)
        ctx.plan, ctx.act_fn = plan, act_fn
        return torch.addmm(direct, hidden, folded)

    @staticmethod
    def backward(ctx, grad):
        rows, weights, folded, pre, hidden = ctx.saved_tensors
        grad = grad.contiguous()
        d_mlp = folded.shape[0]
        grad_out = torch.empty(len(grad), rows.shape[1], dtype=grad.dtype, device=grad.device)
        torch.mm(grad, folded.T, out=grad_out[:, :d_mlp])  # the product writes straight into its columns
        _ACT_BACKWARD[ctx.act_fn](grad_out[:, :d_mlp], pre, hidden)
        grad_out[:, d_mlp:] = grad
        grad_folded = hidden.T @ grad
        grad_rows, grad_weights = _row_sum_backward(grad_out, rows, weights, ctx.plan)
        return grad_rows, grad_weights, grad_folded, None, None


def _evaluate(rows, weights, folded, plan: TokenPlan, act_fn: str):
    """``direct + act(pre) @ folded`` with no graph, the activation in place, in blocks of examples
    on the CPU, so a block's [pre | direct] (2.6 MB at the demo's size) is still in cache when the
    product reads it; the product writes straight into the block's rows of the result (the plan's
    order). The best block depends on the caches: blocks of 512 were ~20 % faster than whole-batch
    passes on an AMD EPYC (1 MB L2) and 1,024 as fast as 512 there (examples in the given order);
    on an Intel Xeon (2 MB L2), with the examples in token order, 1,024 to 4,096 and whole batches
    are ~3 % faster than 512 (in-process A/B)."""
    d_mlp, n = folded.shape[0], plan.n_examples
    block = BLOCK if rows.device.type == "cpu" else max(n, 1)
    result = torch.empty(n, folded.shape[1], dtype=rows.dtype, device=rows.device)
    for start in range(0, n, block):
        part = slice(start, start + block)
        out = _row_sum(rows, weights[part], plan, part)
        hidden = _activate(out[:, :d_mlp], act_fn)
        torch.addmm(out[:, d_mlp:], hidden, folded, out=result[part])
    return result
