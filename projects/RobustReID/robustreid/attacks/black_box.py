"""A model seen only through its outputs: the query interface of black-box defenses and attacks.

``BlackBox(fn)`` answers a batch of inputs with ``fn``'s outputs, computed without autograd and
detached, so nothing its caller does can send a gradient into the model or back to the inputs; it
counts every input row it is asked about (``queries``) and refuses a batch that would exceed
``budget``. ``fn`` is any callable on a batch: e.g. a ``ReidFeatureExtractor`` (features of [0, 1]
images) or its ``logits``.
"""
import torch

__all__ = ["BlackBox", "QueryBudgetExceeded"]


class QueryBudgetExceeded(RuntimeError):
    """A black box was asked for more queries than its budget allows."""


class BlackBox:
    """``fn`` behind a query counter, with no gradient path through it.

    Deliberately not an nn.Module, so the model's parameters cannot be collected through it (an
    optimizer built on ``black_box.parameters()`` is an error). ``chunk`` bounds the rows per call of
    ``fn`` (memory); ``budget`` (None: unlimited) is the total number of input rows it answers.
    """

    def __init__(self, fn, budget=None, chunk=None):
        if budget is not None and budget < 0:
            raise ValueError(f"query budget must be >= 0, got {budget}")
        self._fn = fn
        self.budget = budget
        self.chunk = chunk
        self.queries = 0

    @property
    def remaining(self):
        """Queries left in the budget (None: unlimited)."""
        return None if self.budget is None else self.budget - self.queries

    def __call__(self, inputs):
        rows = len(inputs)
        if self.budget is not None and self.queries + rows > self.budget:
            raise QueryBudgetExceeded(
                f"query budget exhausted: {self.queries} of {self.budget} queries used, a batch of "
                f"{rows} more asked")
        inputs = inputs.detach()
        with torch.no_grad():
            outputs = torch.cat([self._fn(part) for part in inputs.split(self.chunk or max(rows, 1))])
        self.queries += rows
        return outputs.detach()
