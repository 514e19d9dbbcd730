"""Parallelism applied to the unmodified model over torch.distributed: tensor + expert parallel inference
(tensor_parallel.py) and data-parallel training. Nothing in dsv2/model imports this package."""
