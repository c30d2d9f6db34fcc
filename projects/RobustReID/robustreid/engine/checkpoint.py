"""fastreid's Checkpointer, loading with torch.load(weights_only=True) and clear missing-file errors."""
import os

import torch
from fastreid.utils.checkpoint import Checkpointer


class WeightsNotFoundError(FileNotFoundError):
    """MODEL.WEIGHTS (or a --resume checkpoint) names a file that does not exist."""


class RobustCheckpointer(Checkpointer):
    """Checkpointer that never unpickles arbitrary objects unless the user opts out.

    ``weights_only=False`` (config ROBUSTREID.WEIGHTS_ONLY False) restores fastreid's behaviour for
    trusted checkpoints that store non-tensor Python objects.
    """

    def __init__(self, model, save_dir="", *, weights_only=True, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.weights_only = weights_only

    def _load_file(self, f):
        if not os.path.isfile(f):
            raise WeightsNotFoundError(f"checkpoint file not found: {f}")
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=self.weights_only)
        except Exception as e:
            if self.weights_only and "weights_only" in str(e):
                raise RuntimeError(
                    f"{f} holds Python objects that torch.load(weights_only=True) refuses; if you "
                    f"trust this file, set ROBUSTREID.WEIGHTS_ONLY False") from e
            raise
