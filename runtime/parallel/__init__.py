"""One engine over several ranks: sequence and CFG parallelism on torch.distributed."""
