"""The module under DistributedDataParallel, for code that must bypass DDP's wrapper (attack
forwards, functional meta steps, reading a model's extra parts)."""
from torch.nn.parallel import DistributedDataParallel


def unwrap(model):
    """The module inside DistributedDataParallel (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
