"""EAT's data split (Algorithm 1, line 2): the training set in N seeded parts of the same size;
ensemble member i trains on every part but its own (line 5: D \\ D^i)."""
import numpy as np
import torch


def assign_parts(image_paths, members, seed):
    """{path: part in [0, members)}: parts of equal size (+-1), a function of the set of paths and
    ``seed`` alone (the list's order and repeated paths do not matter), so a resumed run, or another
    process, rebuilds the same split."""
    paths = sorted(set(image_paths))
    order = np.random.default_rng(seed).permutation(len(paths))
    return {paths[index]: rank % members for rank, index in enumerate(order)}


def member_mask(image_paths, parts, members):
    """(B, members) bool: row j trains member i unless image j lies in part i. ``parts`` is
    :func:`assign_parts`' map, or None (no split: every member trains on every image)."""
    if parts is None:
        return torch.ones(len(image_paths), members, dtype=torch.bool)
    unknown = [path for path in image_paths if path not in parts]
    if unknown:
        raise ValueError(f"{unknown[0]} is not in the training set the ensemble split was made from "
                       f"({len(unknown)} such image(s) in the batch)")
    own = torch.tensor([parts[path] for path in image_paths])
    return own[:, None] != torch.arange(members)[None, :]
