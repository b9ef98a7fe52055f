"""Several runs of one shape trained together, as one model with a leading run dimension.

Runs that share the prime, the operation, the model's shape, the data split (train fraction, data
seed, label noise) and the schedule (epochs, checkpoints, evaluation) see the same inputs every
epoch; only their weights and AdamW settings (seed, lr, weight decay, betas) differ. Stacked, one
forward pass, one backward pass and one optimizer step serve all of them: at small p, where most
of an epoch is per-operation overhead rather than arithmetic, R runs cost little more than one.

- **Each run stays a run.** Every member is built exactly as it would be alone (the same seeded
  ``HookedTransformer``, so its initial weights are bit-identical) and keeps its own record through
  :class:`~grokpipe.training.train.RunWriter`: checkpoints, resume state, metadata.json, as a lone
  run writes them. Its parameters and AdamW state are copied into the member's own model and
  optimizer whenever the writer saves them, so a member may resume alone, or alone runs in a group.
- **The forward** is the same function as ``HookedTransformer``'s last-position logits, written
  with a leading run dimension (earlier layers at every position, the last at the last one);
  the loss is the lean implementation's (:mod:`grokpipe.training.cross_entropy`) per run.
- **The optimizer** is AdamW (decoupled weight decay, bias correction, eps 1e-8) with a learning
  rate, weight decay and betas per run.
- A member that diverges or stops early leaves the stack; the others go on. Members that resume
  from different epochs train in cohorts, one per starting epoch. The stack's composition at each
  epoch follows from the members' records alone, so a job killed and rerun ends bit-identical to
  an uninterrupted one (same members, same threads).

Losses equal the lone run's to float32 rounding at first; training amplifies rounding over
thousands of epochs as a different thread count does (the bound measured over 500 epochs is in
the tests).
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import RunSpec
from ..errors import GrokpipeError
from ..jobs import group_key
from ..writer_lock import writer_lock
from .cross_entropy import stacked_cross_entropy_and_correct
from .data import make_split
from .folded import ACTIVATIONS, TableLayout, TokenPlan, padded, row_sum
from .lean_forward import unsupported_reason
from .model import resolve_device, training_model
from .train import RunWriter, epoch_bar, is_eval_epoch


def stack_unsupported_reason(model) -> str | None:
    """Why a model cannot be trained stacked (None when it can)."""
    cfg = model.cfg
    reason = unsupported_reason(cfg)
    if reason is None and cfg.d_vocab != cfg.d_vocab_out + 1:
        reason = "vocabulary other than [0, p) and '='"
    return reason


def _qkv_weights(params: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """W_Q, W_K, W_V side by side, (R, d_model, 3·H·E), and their biases (R, 1, 3·H·E)."""
    weights = [params[prefix + f"W_{n}"] for n in "QKV"]  # (R, H, d, E) each
    runs, heads, d_model, d_head = weights[0].shape
    weight = torch.cat([w.permute(0, 2, 1, 3).reshape(runs, d_model, heads * d_head) for w in weights], dim=2)
    bias = torch.cat([params[prefix + f"b_{n}"].reshape(runs, 1, heads * d_head) for n in "QKV"], dim=2)
    return weight, bias


def stacked_logits(params: dict[str, torch.Tensor], cfg, tokens: torch.Tensor) -> torch.Tensor:
    """(R, batch, d_vocab_out) last-position logits of R models whose parameters are stacked along
    a leading dimension, for the same ``tokens``: each row equals ``model_r(tokens)[:, -1]``.

    Products are batched over the runs ((R, rows, d) x (R, d, ·)). The first layer's queries, keys
    and values depend on (position, token) alone, so they are computed once per vocabulary entry
    and position and gathered per example; attention over the few positions is elementwise; the
    last layer attends from the last position only."""
    act = None if cfg.attn_only else ACTIVATIONS[cfg.act_fn]
    scale = cfg.attn_scale if hasattr(cfg, "attn_scale") else math.sqrt(cfg.d_head)
    embed, pos = params["embed.W_E"], params["pos_embed.W_pos"]
    runs, vocab, d_model = embed.shape
    batch, positions = tokens.shape
    heads, d_head = cfg.n_heads, cfg.d_head
    rows = (torch.arange(positions, device=tokens.device) * vocab + tokens).reshape(-1)  # (B·S,) table rows
    x = None
    for layer in range(cfg.n_layers):
        prefix = f"blocks.{layer}.attn."
        weight, bias = _qkv_weights(params, prefix)
        if layer == 0:
            tables = embed[:, None] + pos[:, :positions, None]  # (R, S, V, d): every (position, token)
            qkv_tables = torch.baddbmm(bias, tables.reshape(runs, -1, d_model), weight)
            qkv = qkv_tables[:, rows]
            x = tables.reshape(runs, -1, d_model)[:, rows].view(runs, batch, positions, d_model)
        else:
            qkv = torch.baddbmm(bias, x.reshape(runs, -1, d_model), weight)
        q, k, v = qkv.view(runs, batch, positions, 3, heads, d_head).unbind(dim=3)
        last = layer == cfg.n_layers - 1
        if last:  # the last layer: the last position only
            q, residual = q[:, :, -1:], x[:, :, -1:]
        else:
            residual = x
        scores = (q[:, :, :, None] * k[:, :, None]).sum(dim=-1) / scale  # (R, B, Sq, Sk, H)
        if not last:
            mask = torch.ones(positions, positions, dtype=torch.bool, device=tokens.device).tril()
            scores = scores.masked_fill(~mask[None, None, :, :, None], float("-inf"))
        z = (scores.softmax(dim=3)[..., None] * v[:, :, None]).sum(dim=3)  # (R, B, Sq, H, E)
        w_o = params[prefix + "W_O"].reshape(runs, heads * d_head, d_model)
        out = torch.baddbmm(params[prefix + "b_O"][:, None], z.reshape(runs, -1, heads * d_head), w_o)
        x = residual + out.view(residual.shape)
        if act is not None:  # one (R, B·S, d) x (R, d, d_mlp) batched product, not one per example
            mlp = f"blocks.{layer}.mlp."
            flat = x.reshape(runs, -1, d_model)
            hidden = act(torch.baddbmm(params[mlp + "b_in"][:, None], flat, params[mlp + "W_in"]))
            flat = flat + torch.baddbmm(params[mlp + "b_out"][:, None], hidden, params[mlp + "W_out"])
            x = flat.view(x.shape)
    last_position = x[:, :, -1]  # (R, B, d)
    return torch.baddbmm(params["unembed.b_U"][:, None], last_position, params["unembed.W_U"])


def _folded_tables(params: dict[str, torch.Tensor], cfg, layout: TableLayout) -> tuple[torch.Tensor, ...]:
    """The tables of R stacked one-layer models whose examples all end in the same token
    (:mod:`grokpipe.training.folded`'s, with a leading run dimension): each (head, pair)'s value row
    and the last token's row, read through [W_in | W_U] ((R, n_rows, W) with W = d_mlp + p'), the
    score of each pair's key for the last token ((R, H, U·Q)) and ``W_out @ W_U`` ((R, d_mlp, p'))."""
    a, m = "blocks.0.attn.", "blocks.0.mlp."
    W_E, W_pos = params["embed.W_E"], params["pos_embed.W_pos"]
    runs, heads, d_model, d_head = params[a + "W_K"].shape
    tokens, positions = layout.pair_ids % layout.n_vocab, layout.pair_ids // layout.n_vocab
    pair_embed = W_E[:, tokens] + W_pos[:, positions]  # (R, U, d)
    query_embed = W_E[:, layout.query_tok] + W_pos[:, layout.n_pos - 1, None]  # (R, Q, d)

    def per_head(x, name):  # (R, N, d) -> (R, H, N, E), all heads as one product
        weight = params[a + "W_" + name].permute(0, 2, 1, 3).reshape(runs, d_model, heads * d_head)
        out = torch.bmm(x, weight).view(runs, x.shape[1], heads, d_head).transpose(1, 2)
        return out + params[a + "b_" + name][:, :, None]

    keys, values, queries = per_head(pair_embed, "K"), per_head(pair_embed, "V"), per_head(query_embed, "Q")
    scale = cfg.attn_scale if hasattr(cfg, "attn_scale") else math.sqrt(d_head)
    scores = torch.matmul(keys, queries.transpose(2, 3)).div_(scale)  # (R, H, U, Q)
    W_U = params["unembed.W_U"]
    n_out = W_U.shape[2]
    pad = padded(n_out) - n_out
    read = F.pad(torch.cat([params[m + "W_in"], W_U], dim=2), (0, pad))  # (R, d, W)
    out_bias = torch.baddbmm(params["unembed.b_U"][:, None], params[m + "b_out"][:, None], W_U)[:, 0]
    bias = F.pad(torch.cat([params[m + "b_in"], out_bias], dim=1), (0, pad))  # (R, W)
    folded_out = F.pad(torch.bmm(params[m + "W_out"], W_U), (0, pad))  # (R, d_mlp, p')
    width = read.shape[2]
    W_O = params[a + "W_O"]  # (R, H, E, d)
    # The last token's weight is 1 minus the others': its value joins the token row, and the
    # other pairs' rows hold their difference from it (folded._fold_rows).
    last = values[:, :, -1]  # (R, H, E)
    value_part = values[:, :, :-1] - last[:, :, None]  # (R, H, U_v, E)
    n_value = value_part.shape[2]
    resid = query_embed + params[a + "b_O"][:, None]  # (R, Q, d)
    if n_value * d_model * width + n_value * d_head * d_model < d_head * d_model * width + n_value * d_head * width:
        # few pairs (small p): each value row through W_O[h], then all rows through read at once
        value_out = torch.matmul(value_part, W_O).reshape(runs, heads * n_value, d_model)
        resid = torch.baddbmm(resid, last.reshape(runs, 1, heads * d_head), W_O.reshape(runs, heads * d_head, d_model))
        value_rows = torch.bmm(value_out, read)
        token_rows = torch.baddbmm(bias[:, None], resid, read)
    else:  # many pairs: W_O[h] @ read once per head, then each value row through it
        head_read = torch.bmm(W_O.reshape(runs, heads * d_head, d_model), read)  # (R, H·E, W)
        value_rows = torch.matmul(value_part, head_read.view(runs, heads, d_head, width)).reshape(runs, -1, width)
        token_rows = torch.baddbmm(bias[:, None], resid, read)
        token_rows = torch.baddbmm(token_rows, last.reshape(runs, 1, heads * d_head), head_read)
    rows = torch.cat([value_rows, token_rows], dim=1)
    return rows, scores.reshape(runs, heads, -1), folded_out


@dataclass(frozen=True)
class _StackedPlan:
    """A :class:`TokenPlan`'s rows and examples for R runs at once (run r's table rows offset by r
    tables, its examples by r batches), as :func:`folded.row_sum` reads them. Each row's gradient is
    summed over the same examples in the same order whatever R is, so a member's training does not
    depend on how many runs share its stack (torch's own embedding_bag backward does: a job resumed
    with fewer members in a cohort drifted from the uninterrupted one by float32 rounding)."""

    row_index: torch.Tensor  # (R·B, K)
    n_examples: int
    by_row: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

    @classmethod
    def of(cls, plan: TokenPlan, runs: int, n_rows: int) -> _StackedPlan:
        starts, examples, order, bag_of_row = plan.by_row
        n_batch, n_entries = plan.n_examples, plan.row_index.numel()
        r = torch.arange(runs, device=plan.row_index.device)[:, None]
        return cls(
            row_index=(plan.row_index[None] + r[:, :, None] * n_rows).reshape(runs * n_batch, -1),
            n_examples=runs * n_batch,
            by_row=(
                (starts[None] + r * n_entries).reshape(-1),
                (examples[None] + r * n_batch).reshape(-1),
                (order[None] + r * n_entries).reshape(-1),
                (bag_of_row[None] + r * n_rows).reshape(-1),
            ),
        )


class FoldedStack:
    """The folded forward of R stacked one-layer models (examples ending in one token, as the
    grokking tasks' ``=``): per example a weighted sum of K table rows and one d_mlp × p product, as
    a lone run's lean forward computes, for all runs in one pass over tables with a run dimension.

    The tables are functions of the parameters only, so an evaluation builds them (with their graph)
    and the next training step, on the same parameters, backpropagates through them instead of
    building them again (as :class:`grokpipe.training.lean_forward.LeanForward` does for one run).
    """

    def __init__(self, cfg, token_sets):
        self.cfg = cfg
        self.layout = TableLayout.covering(token_sets, cfg.d_vocab, cfg.n_heads)
        self.plans = {id(tokens): TokenPlan.build(tokens, self.layout) for tokens in token_sets}
        self._kept = None  # tables built by an evaluation, for the next training step
        self._stacked = {}  # (plan, runs) -> the plan for that many runs

    @staticmethod
    def covers(cfg, token_sets) -> bool:
        if cfg.n_layers != 1 or cfg.attn_only:
            return False
        return all(bool((tokens[:, -1] == tokens[0, -1]).all()) for tokens in token_sets)

    def _tables(self, stack: Stack) -> tuple[torch.Tensor, ...]:
        kept, self._kept = self._kept, None  # (stack, its optimizer step, tables): used once
        if kept is not None and kept[0] is stack and kept[1] == stack.optimizer.step:
            return kept[2]
        if torch.is_grad_enabled():
            return _folded_tables(stack.params, self.cfg, self.layout)
        with torch.inference_mode(False), torch.enable_grad():  # with the graph, for the next step
            tables = _folded_tables(stack.params, self.cfg, self.layout)
        self._kept = (stack, stack.optimizer.step, tables)
        return tables

    def loss(self, stack: Stack, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-run losses (R,) and correct counts (R,) of ``tokens`` (one of the token sets given)."""
        plan = self.plans[id(tokens)]
        rows, scores, folded_out = self._tables(stack)
        runs, n_rows, width = rows.shape
        n_batch, n_pos = plan.pair_index.shape
        pattern = scores.index_select(2, plan.score_index).view(runs, -1, n_pos, n_batch).softmax(dim=2)
        weighted = pattern[:, :, : self.layout.n_weighted]  # (R, H, P - 1, B)
        weights = F.pad(weighted.permute(0, 3, 1, 2).reshape(runs * n_batch, -1), (0, 1), value=1.0)
        stacked_plan = self._stacked.get((id(plan), runs))
        if stacked_plan is None:
            stacked_plan = self._stacked[(id(plan), runs)] = _StackedPlan.of(plan, runs, n_rows)
        out = row_sum(rows.reshape(-1, width), weights, stacked_plan).view(runs, n_batch, width)
        d_mlp = folded_out.shape[1]
        hidden = ACTIVATIONS[self.cfg.act_fn](out[..., :d_mlp])
        logits = torch.baddbmm(out[..., d_mlp:], hidden, folded_out)[..., : self.cfg.d_vocab_out]
        # the labels follow the logits into the plan's order (a mean does not depend on the order)
        return stacked_cross_entropy_and_correct(logits, labels.index_select(0, plan.order))


class StackedAdamW:
    """AdamW over stacked parameters, each run with its own lr, weight decay and betas: torch's
    fused AdamW (the lone lean runs' kernel, one pass over each tensor), one parameter group per
    run over that run's slices of the stacked tensors. Its moments live in ``exp_avg`` and
    ``exp_avg_sq``, stacked like the parameters. (A step of per-run broadcast operations, a dozen
    passes over every tensor, took 4.5 ms of a 4-run epoch at p = 13.)"""

    def __init__(self, params: dict[str, torch.Tensor], specs: list[RunSpec], step: int):
        self.params = params
        self.step = step
        self.trainable = [name for name, p in params.items() if p.requires_grad]
        self.exp_avg = {name: torch.zeros_like(params[name]) for name in self.trainable}
        self.exp_avg_sq = {name: torch.zeros_like(params[name]) for name in self.trainable}
        # Each run's slices of the stacked tensors: leaves sharing their storage, updated in place.
        self.slices = [[params[name].detach()[r] for name in self.trainable] for r in range(len(specs))]
        groups = [
            {"params": slices, "lr": s.training.lr, "weight_decay": s.training.weight_decay, "betas": s.training.betas}
            for s, slices in zip(specs, self.slices)
        ]
        self.optimizer = torch.optim.AdamW(groups, fused=True)
        for r, slices in enumerate(self.slices):
            for name, part in zip(self.trainable, slices):
                self.optimizer.state[part] = {
                    "step": torch.tensor(float(step), dtype=torch.float32, device=part.device),
                    "exp_avg": self.exp_avg[name][r],
                    "exp_avg_sq": self.exp_avg_sq[name][r],
                }

    @torch.no_grad()
    def update(self) -> None:
        for r, slices in enumerate(self.slices):
            for name, part in zip(self.trainable, slices):
                part.grad = self.params[name].grad[r]
        self.optimizer.step()
        self.step += 1
        for name in self.trainable:
            self.params[name].grad = None
        for slices in self.slices:
            for part in slices:
                part.grad = None


class Stack:
    """The active members' parameters and AdamW state, stacked; copied back into each member's own
    model and optimizer (``unstack``) whenever its writer saves them."""

    def __init__(self, writers: list[RunWriter]):
        self.writers = writers
        models = [w.model for w in writers]
        names = [name for name, _ in models[0].named_parameters()]
        trainable = {name for name, p in models[0].named_parameters() if p.requires_grad}  # biases are frozen
        members = [dict(m.named_parameters()) for m in models]
        self.params = {
            name: torch.stack([member[name].detach() for member in members]).requires_grad_(name in trainable)
            for name in names
        }
        steps = {_optimizer_step(w.optimizer) for w in writers}
        if len(steps) != 1:
            raise GrokpipeError(f"members of one cohort are at different optimizer steps ({sorted(steps)})")
        self.optimizer = StackedAdamW(self.params, [w.spec for w in writers], steps.pop())
        for index, writer in enumerate(writers):
            state = writer.optimizer.state
            for name, param in writer.model.named_parameters():
                if param in state and name in self.optimizer.exp_avg:
                    self.optimizer.exp_avg[name][index] = state[param]["exp_avg"]
                    self.optimizer.exp_avg_sq[name][index] = state[param]["exp_avg_sq"]

    @torch.no_grad()
    def unstack(self, index: int) -> None:
        """Member ``index``'s current weights and AdamW state into its own model and optimizer."""
        writer = self.writers[index]
        step = torch.tensor(float(self.optimizer.step))
        for name, param in writer.model.named_parameters():
            param.copy_(self.params[name][index])
            if name in self.optimizer.exp_avg:
                writer.optimizer.state[param] = {
                    "step": step.clone(),
                    "exp_avg": self.optimizer.exp_avg[name][index].clone(),
                    "exp_avg_sq": self.optimizer.exp_avg_sq[name][index].clone(),
                }


def _optimizer_step(optimizer: torch.optim.Optimizer) -> int:
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    return steps.pop() if len(steps) == 1 else 0


class _GeneralStack:
    """Any model the stacked forward covers: :func:`stacked_logits` and the lean loss per run."""

    def __init__(self, cfg):
        self.cfg = cfg

    def loss(self, stack: Stack, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return stacked_cross_entropy_and_correct(stacked_logits(stack.params, self.cfg, tokens), labels)


def stacked_objective(cfg, token_sets):
    """(stack, tokens, labels) -> per-run losses and correct counts: the folded forward for
    one-layer models on the grokking tasks' inputs, else :func:`stacked_logits`."""
    return FoldedStack(cfg, token_sets) if FoldedStack.covers(cfg, token_sets) else _GeneralStack(cfg)


def _train_cohort(writers: list[RunWriter], split, objective, progress_bar: bool) -> None:
    """Train members that resume from the same epoch together until each has ended
    (``objective``: the job's :func:`stacked_objective`)."""
    t = writers[0].t
    active = list(writers)
    stack = Stack(active)
    start, last = writers[0].start, max(w.last for w in writers)
    bar = epoch_bar(start, last + 1, t.num_epochs, f"{len(writers)} runs", progress_bar)
    for epoch in bar:
        losses, correct = objective.loss(stack, split.train_tokens, split.train_labels)
        losses.sum().backward()  # runs are independent: each one's gradient is its own loss's
        stack.optimizer.update()
        test_losses = test_correct = None
        if is_eval_epoch(epoch, t):
            with torch.inference_mode():
                test_losses, test_correct = objective.loss(stack, split.test_tokens, split.test_labels)
                test_losses, test_correct = test_losses.tolist(), test_correct.tolist()
        train_values, train_correct = losses.tolist(), correct.tolist()
        checkpoint = (epoch + 1) % t.checkpoint_every == 0
        ended = []
        for index, writer in enumerate(active):
            if checkpoint:
                stack.unstack(index)  # the writer saves the member's own model and optimizer
            test_value = None if test_losses is None else test_losses[index]
            test_count = None if test_correct is None else test_correct[index]
            if writer.record(epoch, train_values[index], train_correct[index], test_value, test_count):
                ended.append(index)  # diverged or stopped early
            elif epoch == writer.last:
                ended.append(index)
        if ended:
            for index in ended:
                if not checkpoint:  # at a checkpoint every member was unstacked above
                    stack.unstack(index)
                active[index].finish()
            active = [w for i, w in enumerate(active) if i not in ended]
            if not active:
                break
            stack = Stack(active)  # the others go on: re-stacked from their own, just-unstacked state
        bar.set_postfix(runs=len(active))
    bar.close()


def train_group(
    specs: list[RunSpec],
    run_dirs: list[str | Path],
    *,
    device: str = "cpu",
    threads: int = 1,
    grokking_threshold: float = 0.01,
    progress_bar: bool = True,
    sweep_cells: list[dict | None] | None = None,
) -> list[dict]:
    """Train (or resume) several runs of one shape together; returns each one's metadata.

    Args:
        specs: the members, which must share :func:`group_key`.
        run_dirs: each member's run directory.
        device, threads: as for :func:`grokpipe.training.train.train`.
        sweep_cells: each member's sweep cell (recorded in its config.json).

    Returns:
        The metadata written to each member's metadata.json, in the order given.

    Example:
        >>> specs = grid(validate_config(config))  # seeds 0..7 of one prime
        >>> train_group(specs, [f"results/grokking/{s.run_name}" for s in specs])
    """
    if not specs or len(specs) != len(run_dirs):
        raise GrokpipeError("train_group needs one run directory per member")
    keys = {group_key(spec) for spec in specs}
    if len(keys) != 1:
        raise GrokpipeError(
            f"{specs[0].run_name} ... : runs of one job must share prime, operation, model, data split and schedule"
        )
    sweep_cells = sweep_cells or [None] * len(specs)
    with ExitStack() as locks:
        for run_dir in run_dirs:
            locks.enter_context(writer_lock(run_dir, "train"))
        return _train_group_locked(
            specs, [Path(d) for d in run_dirs], device, threads, grokking_threshold, progress_bar, sweep_cells
        )


def _train_group_locked(specs, run_dirs, device, threads, threshold, progress_bar, sweep_cells) -> list[dict]:
    # setup
    torch.set_num_threads(threads)
    device = resolve_device(device)
    t = specs[0].training
    split = make_split(
        specs[0].prime, t.frac_train, t.data_seed, device, operation=specs[0].operation, label_noise=t.label_noise
    )
    writers = []
    for spec, run_dir, cell in zip(specs, run_dirs, sweep_cells):
        model = training_model(spec, device)  # seeded as the lone run: bit-identical initial weights
        reason = stack_unsupported_reason(model)
        if reason:
            raise GrokpipeError(f"{run_dir}: cannot be trained stacked ({reason}); use runs_per_job: 1")
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=spec.training.lr, weight_decay=spec.training.weight_decay, betas=spec.training.betas
        )
        writer = RunWriter(spec, run_dir, split, threshold, cell)
        writer.prepare(model, optimizer, device, threads, "stacked")
        writer.segment["job_members"] = [Path(d).name for d in run_dirs]  # trained together with
        # and every file it writes says so: one file alone tells it was trained in a job, and with which runs
        writer.header_extra = {"job_runs": str(len(run_dirs)), "job_members": json.dumps(writer.segment["job_members"])}
        writers.append(writer)
    # its tables' layout and the token plans: built once for the job, whatever its cohorts
    objective = stacked_objective(writers[0].model.cfg, (split.train_tokens, split.test_tokens))

    # loop: one cohort per starting epoch; members with nothing left to train are only finished
    cohorts: dict[int, list[RunWriter]] = {}
    for writer in writers:
        if writer.start <= writer.last:
            cohorts.setdefault(writer.start, []).append(writer)
        else:
            writer.finish()
    for start in sorted(cohorts):
        _train_cohort(cohorts[start], split, objective, progress_bar)

    # finish (each member's finish() ran when it ended)
    return [writer.metadata for writer in writers]
