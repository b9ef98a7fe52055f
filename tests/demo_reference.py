"""The TransformerLens grokking demo (Grokking_Demo.ipynb), verbatim apart from sizes: the reference
that grokpipe's data, training and legacy files are checked against. Nothing here comes from grokpipe,
so a regression in grokpipe's own loss, data or loop cannot hide in the reference."""

import copy

import einops
import torch

DEMO_MODEL = {
    "n_layers": 1,
    "n_heads": 4,
    "d_model": 128,
    "d_head": 32,
    "d_mlp": 512,
    "act_fn": "relu",
    "normalization_type": None,
}


def loss_fn(logits, labels):
    if len(logits.shape) == 3:
        logits = logits[:, -1]
    logits = logits.to(torch.float64)
    log_probs = logits.log_softmax(dim=-1)
    correct_log_probs = log_probs.gather(dim=-1, index=labels[:, None])[:, 0]
    return -correct_log_probs.mean()


def demo_dataset(p, frac_train, data_seed):
    a_vector = einops.repeat(torch.arange(p), "i -> (i j)", j=p)
    b_vector = einops.repeat(torch.arange(p), "j -> (i j)", i=p)
    equals_vector = einops.repeat(torch.tensor(p), " -> (i j)", i=p, j=p)
    dataset = torch.stack([a_vector, b_vector, equals_vector], dim=1)
    labels = (dataset[:, 0] + dataset[:, 1]) % p
    torch.manual_seed(data_seed)
    indices = torch.randperm(p * p)
    cutoff = int(p * p * frac_train)
    return dataset, labels, indices[:cutoff], indices[cutoff:]


def demo_loop(p, frac_train, num_epochs, checkpoint_every, seed, data_seed=598, model_fields=DEMO_MODEL):
    """The demo's training loop; returns its torch.save dict (config is the live HookedTransformerConfig)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    dataset, labels, train_indices, test_indices = demo_dataset(p, frac_train, data_seed)
    train_data, train_labels = dataset[train_indices], labels[train_indices]
    test_data, test_labels = dataset[test_indices], labels[test_indices]
    cfg = HookedTransformerConfig(
        **model_fields, d_vocab=p + 1, d_vocab_out=p, n_ctx=3, init_weights=True, device="cpu", seed=seed
    )
    model = HookedTransformer(cfg)
    for name, param in model.named_parameters():
        if "b_" in name:
            param.requires_grad = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1.0, betas=(0.9, 0.98))
    train_losses, test_losses, checkpoint_epochs, model_checkpoints = [], [], [], []
    for epoch in range(num_epochs):
        train_logits = model(train_data)
        train_loss = loss_fn(train_logits, train_labels)
        train_loss.backward()
        train_losses.append(train_loss.item())
        optimizer.step()
        optimizer.zero_grad()
        with torch.inference_mode():
            test_logits = model(test_data)
            test_loss = loss_fn(test_logits, test_labels)
            test_losses.append(test_loss.item())
        if ((epoch + 1) % checkpoint_every) == 0:
            checkpoint_epochs.append(epoch)
            model_checkpoints.append(copy.deepcopy(model.state_dict()))
    return {
        "model": model.state_dict(),
        "config": model.cfg,
        "checkpoints": model_checkpoints,
        "checkpoint_epochs": checkpoint_epochs,
        "test_losses": test_losses,
        "train_losses": train_losses,
        "train_indices": train_indices,
        "test_indices": test_indices,
    }
