"""A lean forward pass: the same function as HookedTransformer's last-position logits, cheaper.

Training only ever uses the logits at the last position. HookedTransformer computes attention
output, MLP and unembedding at every position; here they are computed at the last position only,
on the very same parameters (the HookedTransformer remains the model of record: same state dict,
same optimizer, same checkpoints). One-layer models fold further (:mod:`grokpipe.training.folded`: a few
table rows per example and one d_mlp × p product); deeper models run their earlier layers in full
and the last one at the last position.

Checked against HookedTransformer in the tests (logits and gradients agree to float32 rounding).
"""

from __future__ import annotations

import torch

from . import folded
from .cross_entropy import count_correct, cross_entropy, cross_entropy_and_correct
from .folded import ACTIVATIONS, TableLayout, TokenPlan


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


def last_position_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits at the last position, (batch, d_vocab_out), equal to ``model(tokens)[:, -1]``."""
    cfg = model.cfg
    act = ACTIVATIONS.get(cfg.act_fn) if not cfg.attn_only else None
    blocks = list(model.blocks)
    if len(blocks) == 1:
        layout = TableLayout.covering([tokens], cfg.d_vocab, cfg.n_heads)
        return folded.logits(model, folded.build_tables(model, layout), TokenPlan.build(tokens, layout))

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

    A run calls it on the same token tensors (train, test) every epoch: given them as
    ``token_sets``, one-layer models get one table layout covering all of them and a TokenPlan
    per tensor, built once. The tables are functions of the parameters, so they are built once per
    parameter update: an evaluation builds them (with their graph) and the next training step,
    on the same parameters, reads and backpropagates through them instead of building them again.
    They are dropped at every step of ``optimizer`` (its step hook: fused optimizers change
    parameters without the version counters seeing it) and whenever the parameters' version
    counters or storage change (``load_state_dict``, any in-place tensor operation). Other tensors
    are planned on their own each call.
    """

    def __init__(self, model, token_sets=(), optimizer=None):
        self.model = model
        self.token_sets = tuple(token_sets)
        self.layout = None
        self.plans: list[TokenPlan] = []
        if model.cfg.n_layers == 1 and self.token_sets:
            with torch.inference_mode(False):  # the tables' graph may index with them
                self.layout = TableLayout.covering(self.token_sets, model.cfg.d_vocab, model.cfg.n_heads)
                self.plans = [TokenPlan.build(tokens, self.layout) for tokens in self.token_sets]
        self._kept = None  # (parameter versions, tables) built by an evaluation
        if optimizer is not None:
            optimizer.register_step_post_hook(self._forget)

    def _forget(self, *_) -> None:
        self._kept = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        plan = self._plan(tokens)
        if plan is None:
            return last_position_logits(self.model, tokens)
        return folded.logits(self.model, self._tables(), plan)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The lean loss of the logits of ``tokens`` against ``labels`` and the number classified
        correctly (for the token sets given to one-layer models, with the logits in the plan's
        order: :func:`folded.loss`)."""
        plan = self._plan(tokens)
        if plan is None:
            return cross_entropy_and_correct(last_position_logits(self.model, tokens), labels)
        return folded.loss(self.model, self._tables(), plan, labels)

    def _plan(self, tokens: torch.Tensor) -> TokenPlan | None:
        """The plan built for ``tokens`` (one of the token sets given, by identity), else None."""
        if self.layout is None:
            return None
        return next((plan for t, plan in zip(self.token_sets, self.plans) if t is tokens), None)

    def _versions(self) -> tuple:
        return tuple((id(p), p._version, p.data_ptr()) for p in self.model.parameters())

    def _tables(self) -> folded.Tables:
        versions = self._versions()
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] != versions:
            kept = None
        if torch.is_grad_enabled():  # training: one backward frees the graph, so never keep them
            return kept[1] if kept is not None else folded.build_tables(self.model, self.layout)
        if kept is None:
            with torch.inference_mode(False), torch.enable_grad():  # with the graph, for the next step
                kept = (versions, folded.build_tables(self.model, self.layout))
        self._kept = kept
        return kept[1]


def loss_for(implementation: str):
    """The loss an implementation trains and evaluates with: the demo's own for
    ``hooked_transformer`` (bit-exact to the demo), :func:`cross_entropy` for ``lean``."""
    from .model import loss_fn

    return cross_entropy if implementation == "lean" else loss_fn


def forward_fn(model, implementation: str, token_sets=(), optimizer=None):
    """The callable training uses: tokens -> last-position logits (``token_sets``: the token
    tensors it will be called with; ``optimizer``: the one updating the parameters; see
    :class:`LeanForward`)."""
    if implementation == "lean" and unsupported_reason(model.cfg) is None:
        return LeanForward(model, token_sets, optimizer)
    return lambda tokens: model(tokens)[:, -1]


def objective_fn(model, implementation: str, token_sets=(), optimizer=None):
    """The callable training and verification compute losses with: (tokens, labels) -> (the loss of
    :func:`loss_for` on the last-position logits, the number of examples classified correctly as a
    0-d tensor) (arguments as :func:`forward_fn`)."""
    forward = forward_fn(model, implementation, token_sets, optimizer)
    if isinstance(forward, LeanForward):
        return forward.loss
    loss = loss_for(implementation)

    def objective(tokens, labels):
        logits = forward(tokens)
        return loss(logits, labels), count_correct(logits.detach(), labels)

    return objective
