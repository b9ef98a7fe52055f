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

import math
import sys
from contextlib import ExitStack
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import RunSpec
from ..errors import GrokpipeError
from ..jobs import group_key
from ..writer_lock import writer_lock
from .cross_entropy import stacked_cross_entropy_and_correct
from .data import make_split
from .folded import ACTIVATIONS
from .lean_forward import unsupported_reason
from .model import resolve_device, training_model
from .train import RunWriter, is_eval_epoch

EPS = 1e-8  # torch.optim.AdamW's default, which lone runs use


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


class StackedAdamW:
    """AdamW over stacked parameters, each run with its own lr, weight decay and betas (the update
    of ``torch.optim.AdamW``, step by step, with per-run scalars)."""

    def __init__(self, params: dict[str, torch.Tensor], specs: list[RunSpec], step: int):
        self.params = params
        device = next(iter(params.values())).device
        hyper = torch.tensor(
            [[s.training.lr, s.training.weight_decay, *s.training.betas] for s in specs],
            dtype=torch.float64,
            device=device,
        )
        self.lr, self.weight_decay, self.beta1, self.beta2 = hyper.unbind(dim=1)
        self.step = step
        self.exp_avg = {name: torch.zeros_like(p) for name, p in params.items() if p.requires_grad}
        self.exp_avg_sq = {name: torch.zeros_like(p) for name, p in params.items() if p.requires_grad}

    def _per_run(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        decay = 1 - self.lr * self.weight_decay
        bias1 = 1 - self.beta1**self.step
        bias2_sqrt = (1 - self.beta2**self.step).sqrt()
        step_size = self.lr / bias1
        for name, exp_avg in self.exp_avg.items():
            param, grad = self.params[name], self.params[name].grad
            exp_avg_sq = self.exp_avg_sq[name]
            param.mul_(self._per_run(decay, param))
            exp_avg.lerp_(grad, self._per_run(1 - self.beta1, param))
            exp_avg_sq.mul_(self._per_run(self.beta2, param)).addcmul_(
                grad, grad * self._per_run(1 - self.beta2, param)
            )
            denom = (exp_avg_sq.sqrt() / self._per_run(bias2_sqrt, param)).add_(EPS)
            param.addcdiv_(exp_avg * self._per_run(-step_size, param), denom)
            param.grad = None


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


def _train_cohort(writers: list[RunWriter], split, cfg, progress_bar: bool) -> None:
    """Train members that resume from the same epoch together until each has ended."""
    t = writers[0].t
    active = list(writers)
    stack = Stack(active)
    start, last = writers[0].start, max(w.last for w in writers)
    bar = tqdm(
        range(start, last + 1),
        initial=start,
        total=t.num_epochs,
        desc=f"{len(writers)} runs",
        file=sys.stderr,
        mininterval=2.0,
        disable=not progress_bar,
        ascii=True,
    )
    for epoch in bar:
        losses, correct = stacked_cross_entropy_and_correct(
            stacked_logits(stack.params, cfg, split.train_tokens), split.train_labels
        )
        losses.sum().backward()  # runs are independent: each one's gradient is its own loss's
        stack.optimizer.update()
        test_losses = test_correct = None
        if is_eval_epoch(epoch, t):
            with torch.inference_mode():
                test_losses, test_correct = stacked_cross_entropy_and_correct(
                    stacked_logits(stack.params, cfg, split.test_tokens), split.test_labels
                )
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
        writers.append(writer)
    cfg = writers[0].model.cfg

    # loop: one cohort per starting epoch; members with nothing left to train are only finished
    cohorts: dict[int, list[RunWriter]] = {}
    for writer in writers:
        if writer.start <= writer.last:
            cohorts.setdefault(writer.start, []).append(writer)
        else:
            writer.finish()
    for start in sorted(cohorts):
        _train_cohort(cohorts[start], split, cfg, progress_bar)

    # finish (each member's finish() ran when it ended)
    return [writer.metadata for writer in writers]
