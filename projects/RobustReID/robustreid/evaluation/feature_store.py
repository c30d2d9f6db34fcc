"""Features of galleries larger than RAM: one float32 ``.npy`` on disk, written chunk by chunk.

A store is a directory with

* ``features.npy``: a standard ``(rows, dim)`` float32 ``.npy`` (``np.load(path, mmap_mode="r")``
  maps it), pre-allocated (sparse) when the store is created;
* ``manifest.json``: rows, dim, chunk size, the chunks already written and ``inputs``, a
  description of what the features were computed from (config, weights, image list digests).

:meth:`FeatureStore.fill` writes the missing chunks only, recording each one in the manifest after
its rows are on disk, so an interrupted extraction resumes where it stopped; a store is only
reopened for the same ``inputs``.

Reading never keeps the file mapped: :func:`read_rows` reads a block with one ``pread``-style read
and :func:`take_rows` maps the file just for one gather. A mapping that stays open would count
every page ever read in the process's resident set (RSS), i.e. the whole gallery after one scan.
"""
import json
import os
from typing import Callable, Iterator, Tuple

import numpy as np

from ..config import ConfigError

MANIFEST = "manifest.json"
FEATURES = "features.npy"
DTYPE = np.dtype(np.float32)


def npy_layout(path) -> Tuple[Tuple[int, ...], int]:
    """``(shape, data offset in bytes)`` of a float32 C-order ``.npy`` file."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
        except ValueError as e:
            raise ConfigError(f"{path}: not a .npy file ({e})") from None
        if version not in ((1, 0), (2, 0)):
            raise ConfigError(f"{path}: .npy format version {version} is not supported")
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        offset = f.tell()
    if dtype != DTYPE or fortran or len(shape) != 2:
        raise ConfigError(f"{path}: expected a 2-d float32 C-order .npy of features, got "
                          f"{dtype} shape {shape}{' (Fortran order)' if fortran else ''}")
    return shape, offset


def read_rows(path, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a features ``.npy`` as an array in RAM (no mapping left behind)."""
    (rows, dim), offset = npy_layout(path)
    start, stop = max(0, start), min(stop, rows)
    count = max(stop - start, 0) * dim
    out = np.fromfile(path, dtype=DTYPE, count=count, offset=offset + start * dim * DTYPE.itemsize)
    return out.reshape(-1, dim)


def iter_blocks(path, block_rows: int) -> Iterator[Tuple[int, np.ndarray]]:
    """``(start, rows)`` blocks of a features ``.npy``, ``block_rows`` rows at a time."""
    (rows, _), _ = npy_layout(path)
    for start in range(0, rows, block_rows):
        yield start, read_rows(path, start, start + block_rows)


def take_rows(path, indices) -> np.ndarray:
    """Rows ``indices`` (any shape of int) of a features ``.npy``, shape ``indices.shape + (dim,)``.
    The file is mapped for this gather only."""
    indices = np.asarray(indices, dtype=np.int64)
    mapped = np.load(path, mmap_mode="r")
    # Gathering the distinct rows in file order lets the kernel map neighbouring pages per fault.
    unique, inverse = np.unique(indices.ravel(), return_inverse=True)
    rows = np.array(mapped[unique])  # a copy: the mapping goes with ``mapped``
    return rows[inverse].reshape(*indices.shape, mapped.shape[1])


class FeatureStore:
    """A resumable on-disk ``(rows, dim)`` feature matrix (see the module docstring)."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.path = os.path.join(self.directory, FEATURES)
        self.manifest_path = os.path.join(self.directory, MANIFEST)
        with open(self.manifest_path) as f:
            self.manifest = json.load(f)

    # --- creation / reopening --------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, directory, rows: int, dim: int, chunk_rows: int, inputs=None):
        """The store in ``directory``: created (file pre-allocated) if absent, else reopened to
        resume. Reopening for other ``rows``/``dim``/``chunk_rows``/``inputs`` is a ConfigError:
        mixing features of two models or image lists in one file would be silent garbage."""
        if rows < 1 or dim < 1 or chunk_rows < 1:
            raise ValueError(f"a feature store needs rows, dim, chunk_rows >= 1, got "
                             f"{rows}, {dim}, {chunk_rows}")
        wanted = {"rows": int(rows), "dim": int(dim), "chunk_rows": int(chunk_rows),
                  "dtype": DTYPE.name, "inputs": inputs or {}}
        manifest_path = os.path.join(str(directory), MANIFEST)
        if os.path.isfile(manifest_path):
            store = cls(directory)
            found = {key: store.manifest.get(key) for key in wanted}
            if found != wanted:
                diff = {k: (found[k], wanted[k]) for k in wanted if found[k] != wanted[k]}
                raise ConfigError(f"feature store {directory} was written for other inputs "
                                  f"(stored, requested): {diff}; use a new directory")
            return store
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(str(directory), FEATURES)
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": DTYPE.str, "fortran_order": False, "shape": (int(rows), int(dim))})
            f.truncate(f.tell() + rows * dim * DTYPE.itemsize)  # sparse: no disk used until written
        _write_json(manifest_path, {**wanted, "chunks_done": []})
        return cls(directory)

    # --- state -----------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    @property
    def dim(self) -> int:
        return self.manifest["dim"]

    @property
    def num_chunks(self) -> int:
        return -(-self.rows // self.manifest["chunk_rows"])

    def chunk_range(self, chunk: int) -> Tuple[int, int]:
        size = self.manifest["chunk_rows"]
        return chunk * size, min((chunk + 1) * size, self.rows)

    def missing_chunks(self):
        done = set(self.manifest["chunks_done"])
        return [c for c in range(self.num_chunks) if c not in done]

    @property
    def complete(self) -> bool:
        return not self.missing_chunks()

    def check_complete(self):
        missing = self.missing_chunks()
        if missing:
            raise ConfigError(f"feature store {self.directory} is incomplete: "
                              f"{self.num_chunks - len(missing)}/{self.num_chunks} chunks written; "
                              f"rerun the extraction to resume it")

    # --- writing ---------------------------------------------------------------------------------
    def write_chunk(self, chunk: int, features):
        """Write chunk ``chunk``'s rows, flush them to disk, then record the chunk as done."""
        start, stop = self.chunk_range(chunk)
        block = np.ascontiguousarray(features, dtype=DTYPE)
        if block.shape != (stop - start, self.dim):
            raise ValueError(f"chunk {chunk} of {self.directory} needs shape "
                             f"{(stop - start, self.dim)}, got {block.shape}")
        _, offset = npy_layout(self.path)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, block.tobytes(), offset + start * self.dim * DTYPE.itemsize)
            os.fsync(fd)  # rows on disk before the manifest says so
        finally:
            os.close(fd)
        self.manifest["chunks_done"] = sorted(set(self.manifest["chunks_done"]) | {chunk})
        _write_json(self.manifest_path, self.manifest)

    def fill(self, compute: Callable[[int, int], np.ndarray]) -> int:
        """Compute and write every missing chunk: ``compute(start, stop)`` returns those rows.
        Returns the number of chunks written by this call."""
        missing = self.missing_chunks()
        for chunk in missing:
            self.write_chunk(chunk, compute(*self.chunk_range(chunk)))
        return len(missing)


def _write_json(path, data):
    """Atomic: a crash leaves either the old or the new manifest, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class InMemoryFeatures:
    """A gallery held in RAM, with the reading interface of :class:`NpyFeatures`."""

    def __init__(self, features):
        if hasattr(features, "detach"):  # a torch tensor
            features = features.detach().cpu().numpy()
        self.features = np.ascontiguousarray(features, dtype=DTYPE)
        if self.features.ndim != 2:
            raise ValueError(f"features must be (rows, dim), got shape {self.features.shape}")

    @property
    def shape(self):
        return self.features.shape

    def blocks(self, block_rows: int) -> Iterator[Tuple[int, np.ndarray]]:
        for start in range(0, self.shape[0], block_rows):
            yield start, self.features[start:start + block_rows]

    def take(self, indices) -> np.ndarray:
        return self.features[np.asarray(indices, dtype=np.int64)]


class NpyFeatures:
    """A gallery in a features ``.npy`` (e.g. a complete :class:`FeatureStore`), read block by
    block; never held in RAM as a whole."""

    def __init__(self, path):
        self.path = str(path)
        self.shape, _ = npy_layout(self.path)

    def blocks(self, block_rows: int) -> Iterator[Tuple[int, np.ndarray]]:
        return iter_blocks(self.path, block_rows)

    def take(self, indices) -> np.ndarray:
        return take_rows(self.path, indices)


def open_features(source):
    """A gallery to index from an array/tensor (RAM), a ``.npy`` path or a FeatureStore directory
    (which must be complete)."""
    if not isinstance(source, (str, os.PathLike)):
        return InMemoryFeatures(source)
    source = str(source)
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, MANIFEST)):
            raise ConfigError(f"{source}: not a feature store (no {MANIFEST})")
        store = FeatureStore(source)
        store.check_complete()
        return NpyFeatures(store.path)
    if not os.path.isfile(source):
        raise ConfigError(f"features not found: {source}")
    return NpyFeatures(source)
