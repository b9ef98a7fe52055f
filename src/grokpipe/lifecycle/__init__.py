"""The model lifecycle beyond a run: LoRA fine-tuning of exports, adapter directories, merging."""
