"""The lean forward is another implementation of HookedTransformer's last-position logits."""

import pytest
import torch
from conftest import tiny_config
from demo_reference import DEMO_MODEL, demo_loop
from transformer_lens import HookedTransformer, HookedTransformerConfig

from grokpipe.config import grid, validate_config
from grokpipe.training import folded
from grokpipe.training.data import make_split
from grokpipe.training.lean_forward import forward_fn, last_position_logits, objective_fn, unsupported_reason
from grokpipe.training.model import loss_fn
from grokpipe.training.train import train

CONFIGS = [
    dict(n_layers=1, n_heads=4, d_model=128, d_head=32, d_mlp=512, act_fn="relu"),  # the demo's
    dict(n_layers=1, n_heads=2, d_model=32, d_head=8, d_mlp=48, act_fn="gelu"),
    dict(n_layers=1, n_heads=2, d_model=16, d_head=8, d_mlp=24, act_fn="silu"),
    dict(n_layers=1, n_heads=3, d_model=24, d_head=8, attn_only=True),
    dict(n_layers=2, n_heads=2, d_model=32, d_head=16, d_mlp=64, act_fn="silu"),
    dict(n_layers=3, n_heads=1, d_model=16, d_head=16, attn_only=True),
]


def perturbed_model(p, fields):
    cfg = HookedTransformerConfig(
        **fields,
        normalization_type=None,
        d_vocab=p + 1,
        d_vocab_out=p,
        n_ctx=3,
        init_weights=True,
        seed=3,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero biases too, so every parameter is exercised
        for param in model.parameters():
            param += 0.05 * torch.randn(param.shape, generator=generator)
    return model


def test_attention_tables_backward_with_only_the_values_used_matches_autograd(monkeypatch):
    model = perturbed_model(13, CONFIGS[0])
    tokens = make_split(13, 0.5, 598).train_tokens
    layout = folded.TableLayout.covering([tokens], 14, model.cfg.n_heads)
    grads = []
    for composed in (False, True):
        monkeypatch.setattr(folded, "COMPOSED_BACKWARD", composed)
        model.zero_grad()
        tables = folded.attention_tables(model, layout)
        (tables.values * torch.linspace(-1, 1, tables.values.numel()).view_as(tables.values)).sum().backward()
        grads.append(
            {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
        )
    assert grads[0]["blocks.0.attn.W_V"].abs().sum() > 0 and grads[0]["blocks.0.attn.W_K"].abs().sum() == 0
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, msg=name)


@pytest.mark.parametrize("varying_last", [False, True], ids=["shared-last-token", "varying-last-token"])
@pytest.mark.parametrize("composed", [False, True], ids=["cpu-backward", "composed-backward"])
@pytest.mark.parametrize("fields", CONFIGS, ids=lambda f: f"{f['n_layers']}L-{f.get('act_fn', 'attn_only')}")
def test_logits_and_gradients_match_hooked_transformer(fields, composed, varying_last, monkeypatch):
    """Both backward paths: the hand-written one (CPU) and autograd over torch's ops (other
    devices); both table layouts: every example ending in "=" (its rows folded into the token
    row) and last tokens that vary."""
    monkeypatch.setattr(folded, "COMPOSED_BACKWARD", composed)
    p = 13
    model = perturbed_model(p, fields)
    assert unsupported_reason(model.cfg) is None
    split = make_split(p, 0.5, 598)
    tokens = torch.cat([split.train_tokens, split.test_tokens])
    if varying_last:
        tokens = torch.cat([tokens, tokens[:7].flip(1)])
    layout = folded.TableLayout.covering([tokens], p + 1, model.cfg.n_heads)
    assert layout.shared_last != varying_last
    labels = torch.randint(0, p, (len(tokens),), generator=torch.Generator().manual_seed(1))

    ref = model(tokens)[:, -1]
    ours = last_position_logits(model, tokens)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-5), (ours - ref).abs().max()

    grads = {}
    for name, fn in (("ref", lambda: model(tokens)[:, -1]), ("lean", lambda: last_position_logits(model, tokens))):
        model.zero_grad()
        loss_fn(fn(), labels).backward()
        grads[name] = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    assert grads["ref"].keys() == grads["lean"].keys()
    for name in grads["ref"]:
        assert torch.allclose(grads["lean"][name], grads["ref"][name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("composed", [False, True], ids=["cpu-backward", "composed-backward"])
@pytest.mark.parametrize("fields", CONFIGS, ids=lambda f: f"{f['n_layers']}L-{f.get('act_fn', 'attn_only')}")
def test_objective_matches_the_demo_loss_on_hooked_transformer(fields, composed, monkeypatch):
    """The loss training and verification compute (labels following the logits into the plan's
    order for one-layer models): value, with and without a graph, and gradients, on shuffled
    examples so that the plan's order is not theirs."""
    monkeypatch.setattr(folded, "COMPOSED_BACKWARD", composed)
    p = 13
    model = perturbed_model(p, fields)
    split = make_split(p, 0.5, 598)
    shuffle = torch.randperm(len(split.test_tokens), generator=torch.Generator().manual_seed(2))
    tokens, labels = split.test_tokens[shuffle], split.test_labels[shuffle]
    objective = objective_fn(model, "lean", (split.train_tokens, tokens))
    if fields["n_layers"] == 1:
        assert not torch.equal(objective.__self__.plans[1].order, torch.arange(len(tokens)))

    model.zero_grad()
    reference = loss_fn(model(tokens)[:, -1], labels)
    reference.backward()
    expected = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad()
    ours, correct = objective(tokens, labels)
    ours.backward()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert correct.item() == (model(tokens)[:, -1].argmax(-1) == labels).sum().item()  # the accuracy too
    for name, grad in expected.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6), name
    with torch.inference_mode():
        assert objective(tokens, labels)[0].item() == pytest.approx(reference.item(), rel=1e-5)


def test_unsupported_configs_fall_back_to_hooked_transformer():
    model = HookedTransformer(
        HookedTransformerConfig(
            n_layers=1,
            n_heads=2,
            d_model=16,
            d_head=8,
            d_mlp=32,
            act_fn="relu",
            normalization_type="LN",
            d_vocab=6,
            d_vocab_out=5,
            n_ctx=3,
            device="cpu",
        )
    )
    assert unsupported_reason(model.cfg) == "normalization_type is set"
    tokens = make_split(5, 0.5, 1).train_tokens
    assert torch.equal(forward_fn(model, "lean")(tokens), model(tokens)[:, -1])


def test_lean_training_follows_the_demo_loop_within_float_tolerance(tmp_path):
    torch.set_num_threads(1)
    demo = demo_loop(p=11, frac_train=0.3, num_epochs=300, checkpoint_every=100, seed=999)
    config = validate_config(
        {
            "model_name": "demo",
            "primes": [11],
            "seeds": [999],
            "model": DEMO_MODEL,
            "training": {"frac_train": 0.3, "num_epochs": 300, "checkpoint_every": 100},
        }
    )
    meta = train(grid(config)[0], tmp_path / "demo_p11_seed999", threads=1, progress_bar=False)
    # Float32 rounding differs between the two implementations; training amplifies it over time
    # (as a different thread count does). Early epochs agree to rounding, whole curves closely.
    for ours, ref in ((meta["train_losses"], demo["train_losses"]), (meta["test_losses"], demo["test_losses"])):
        rel = [abs(a - b) / abs(b) for a, b in zip(ours, ref)]
        assert max(rel[:20]) < 1e-6, max(rel[:20])
        assert max(rel) < 5e-2, max(rel)


def test_eval_every_records_null_for_skipped_epochs(tmp_path):
    config = validate_config(
        tiny_config(primes=[5], seeds=[0], training={"num_epochs": 23, "checkpoint_every": 10, "eval_every": 4})
    )
    meta = train(grid(config)[0], tmp_path / "tiny_p5_seed0", progress_bar=False)
    evaluated = [e for e, loss in enumerate(meta["test_losses"]) if loss is not None]
    assert evaluated == [3, 7, 9, 11, 15, 19, 22]  # every 4th, every checkpoint, and the last epoch
    assert len(meta["test_losses"]) == len(meta["train_losses"]) == 23
    assert meta["eval_every"] == 4 and all(loss is not None for loss in meta["train_losses"])


def test_tables_are_built_once_per_parameter_update(monkeypatch):
    """An evaluation builds the tables; the next training step on the same parameters reuses them
    (same gradients, bit for bit, as building them afresh); an optimizer step makes them stale."""
    p = 13
    model = perturbed_model(p, CONFIGS[0])
    split = make_split(p, 0.4, 598)
    builds = []
    real_build = folded.build_tables
    monkeypatch.setattr(folded, "build_tables", lambda *a: builds.append(1) or real_build(*a))

    def gradients(forward):
        model.zero_grad()
        loss_fn(forward(split.train_tokens), split.train_labels).backward()
        return {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    fresh = gradients(forward_fn(model, "lean", (split.train_tokens, split.test_tokens)))
    forward = forward_fn(model, "lean", (split.train_tokens, split.test_tokens))
    with torch.inference_mode():
        evaluated = forward(split.test_tokens)
    assert torch.allclose(evaluated, model(split.test_tokens)[:, -1], rtol=1e-5, atol=1e-5)
    builds.clear()
    reused = gradients(forward)
    assert builds == [] and fresh.keys() == reused.keys()
    assert all(torch.equal(fresh[n], reused[n]) for n in fresh)
    assert gradients(forward).keys() == fresh.keys() and builds == [1]  # a second step without an update
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.inference_mode():
        after = forward(split.test_tokens)
    assert len(builds) == 2 and torch.allclose(after, model(split.test_tokens)[:, -1], rtol=1e-5, atol=1e-5)

    # A fused optimizer changes parameters without their version counters: its step hook tells.
    fused = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    forward = forward_fn(model, "lean", (split.train_tokens, split.test_tokens), fused)
    with torch.inference_mode():
        forward(split.test_tokens)
    gradients(forward)  # fills .grad for the step
    versions = [q._version for q in model.parameters()]
    fused.step()
    assert versions == [q._version for q in model.parameters()]
    builds.clear()
    with torch.inference_mode():
        after = forward(split.test_tokens)
    assert builds == [1] and torch.allclose(after, model(split.test_tokens)[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("margin", [0.0, 10.0, 25.0])
def test_lean_cross_entropy_matches_the_demo_loss(margin):
    """Float32 exponentials, float64 sums: the demo's loss to float32 rounding, from uncertain to
    very confident predictions (where the demo's 1 - softmax cancels, ours keeps the label's gradient)."""
    from grokpipe.training.cross_entropy import cross_entropy

    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 113, generator=generator)
    labels = torch.randint(0, 113, (500,), generator=generator)
    logits[torch.arange(500), labels] += margin
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    value, expected = cross_entropy(ours, labels), loss_fn(ref, labels)
    assert value.dtype == torch.float64 and value.item() == pytest.approx(expected.item(), rel=1e-8)
    value.backward()
    expected.backward()
    others = torch.ones_like(logits, dtype=torch.bool)
    others[torch.arange(500), labels] = False
    assert torch.allclose(ours.grad[others], ref.grad[others], rtol=1e-5, atol=0)
    assert torch.allclose(ours.grad[~others], ref.grad[~others], rtol=1e-5 if margin < 20 else 1e-2, atol=0)
    assert (ours.grad[~others] < 0).all()  # the label's gradient survives however confident


def test_lean_cross_entropy_gradient_has_no_subnormals():
    """Late in training the softmax of wrong classes falls below float32's smallest normal; those
    gradient entries are zeroed (subnormals cost Intel CPUs a microcode assist per operation),
    every other entry is the demo's."""
    from grokpipe.training.cross_entropy import cross_entropy

    tiny = torch.finfo(torch.float32).tiny
    generator = torch.Generator().manual_seed(1)
    logits = 3 * torch.randn(400, 113, generator=generator)
    labels = torch.randint(0, 113, (400,), generator=generator)
    logits[torch.arange(400), labels] += 80.0  # exp(-80 ± 9) / 400: normal and subnormal entries both
    ours, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    cross_entropy(ours, labels).backward()
    loss_fn(ref, labels).backward()
    subnormal = (ref.grad != 0) & (ref.grad.abs() < tiny)
    assert subnormal.sum() > 1000  # the demo's gradient has them: what is checked below exists
    assert not ((ours.grad != 0) & (ours.grad.abs() < tiny)).any()
    assert (ours.grad[subnormal] == 0).all()
    normal = ref.grad.abs() >= tiny
    assert normal.sum() > 1000
    assert torch.allclose(ours.grad[normal], ref.grad[normal], rtol=1e-4, atol=0)


def test_token_plan_processes_examples_in_token_order():
    """The plan walks the examples in lexicographic token order; ``inverse`` takes results back."""
    split = make_split(13, 0.4, 5)
    tokens = split.train_tokens
    layout = folded.TableLayout.covering([tokens], 14, 2)
    plan = folded.TokenPlan.build(tokens, layout)
    walked = tokens[plan.order]
    keys = (walked[:, 0] * 100 + walked[:, 1]).tolist()
    assert keys == sorted(keys) and keys != (tokens[:, 0] * 100 + tokens[:, 1]).tolist()
    assert torch.equal(plan.order[plan.inverse], torch.arange(len(tokens)))
    assert torch.equal(layout.pair_ids[plan.pair_index] % 14, walked)


def test_flush_subnormal_zeroes_only_subnormals():
    from grokpipe.training.cross_entropy import flush_subnormal_

    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([1e-39, -1e-39, 1e-45, tiny, -tiny, 0.0, 1.0, -2.5e-30])
    assert flush_subnormal_(x) is x
    assert x.tolist() == torch.tensor([0.0, 0.0, 0.0, tiny, -tiny, 0.0, 1.0, -2.5e-30]).tolist()
