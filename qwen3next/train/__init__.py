"""Training: data (corpus, BPE tokenizer, token files, sampler), losses, optimizer, trainer, entry points."""
from .commands import data_main, train_main  # noqa: F401
