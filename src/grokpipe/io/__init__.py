"""Reading checkpoints written by others: the restricted pickle loader and the sharded formats
(Hugging Face, torch.distributed.checkpoint, DeepSpeed ZeRO), each turned into one
"source -> tensors + provenance" description that :mod:`grokpipe.consolidate` streams out."""
