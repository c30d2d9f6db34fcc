"""The process-wide random number generators (Python's ``random``, numpy's global RandomState,
torch's CPU and CUDA generators) as plain values a checkpoint can hold, and two ways to keep one
client's draws out of everyone else's streams.

States are lists / ints / floats / tensors only, so checkpoints holding them still load with
``torch.load(weights_only=True)``.

fastreid's samplers and transforms draw from the global generators. DataLoaderX (fastreid's loader
on CUDA machines) runs them in a background thread, so every use of numpy's global state here holds
``NUMPY_LOCK``: a capture never sees a sampler's state swapped in half-way.
"""
import contextlib
import os
import random
import threading

import numpy as np
import torch

NUMPY_LOCK = threading.Lock()


def _unlock_in_child():
    """A child forked while another thread held the lock would inherit it locked forever."""
    global NUMPY_LOCK
    NUMPY_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_unlock_in_child)


def _numpy_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def _set_numpy_state(state):
    name, keys, pos, has_gauss, gauss = state
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def capture():
    """Every global generator's state; CUDA's only where CUDA is in use."""
    with NUMPY_LOCK:
        numpy_state = _numpy_state()
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state):
    """Set the global generators to a :func:`capture`'d state."""
    random.setstate(state["python"])
    with NUMPY_LOCK:
        _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def seeded_cpu_generators():
    """Inside, the CPU generators may be re-seeded freely (``seed_cpu_generators``); on exit they are
    back where they were, so the caller's streams do not depend on what ran inside."""
    with NUMPY_LOCK:
        python_state, numpy_state = random.getstate(), np.random.get_state()
        torch_state = torch.get_rng_state()
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            torch.set_rng_state(torch_state)


def seed_cpu_generators(seed):
    """Seed Python's, numpy's and torch's CPU generators (not CUDA's) with a 32-bit ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


class PrivateNumpyState:
    """numpy's global RandomState as one client alone sees it.

    fastreid's samplers call ``np.random.seed`` once and then draw from the global state, so their
    index stream depends on every other numpy draw in the process. ``with private:`` swaps this
    client's own state in (the process's back out on exit): the client's draws are a function of
    its seed alone, and nobody else's stream moves.
    """

    def __init__(self):
        self.state = None  # until the client seeds it on its first draw

    def __enter__(self):
        NUMPY_LOCK.acquire()
        self._outside = np.random.get_state()
        if self.state is not None:
            np.random.set_state(self.state)
        return self

    def __exit__(self, *exc):
        self.state = np.random.get_state()
        np.random.set_state(self._outside)
        NUMPY_LOCK.release()


class PythonRandomState:
    """A ``random.Random`` as a checkpointable (state_dict / load_state_dict)."""

    def __init__(self, rng):
        self.rng = rng

    def state_dict(self):
        return {"state": self.rng.getstate()}

    def load_state_dict(self, state):
        version, internal, gauss = state["state"]
        self.rng.setstate((version, tuple(internal), gauss))


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


def unchanged_since(state):
    """Whether every global generator is still at the :func:`capture`'d ``state``."""
    return _equal(state, capture())

