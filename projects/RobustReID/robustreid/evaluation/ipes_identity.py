"""Do IPES-GAN's generated views keep the source identity? (issue 16's check)

A frozen ReID model (by default the run's teacher E_std, the source-trained model) retrieves, for
each generated view I_S->G of a source image (rendered in a random target image's pose and style),
the nearest real source training image other than the one it was generated from. The view keeps
its identity when that image shows the same person. Chance is the hit rate of a uniformly random
pick among those images.
"""
import numpy as np
import torch
from fastreid.data.build import fast_batch_collator

__all__ = ["identity_preservation"]


def _batches(dataset, indices, size):
    for start in range(0, len(indices), size):
        yield fast_batch_collator([dataset[int(i)] for i in indices[start:start + size]])


@torch.no_grad()
def identity_preservation(model, features, source, target, pairs=256, seed=0, batch_size=32):
    """{"rank1", "chance" (%), "pairs"} for ``pairs`` random (source, target) image pairs.

    ``model``: an IPESGAN (``translate``); ``features``: the frozen ReID model, images in [0, 255]
    (B, 3, H, W) -> features (B, d); ``source`` / ``target``: robustreid.data.ipes.PosedImages
    (unflipped), the source one also the gallery."""
    was_training = model.training
    model.eval()
    try:
        rng = np.random.default_rng(seed)
        src = rng.integers(len(source), size=pairs)
        tgt = rng.integers(len(target), size=pairs)
        gallery, labels = [], []
        for batch in _batches(source, np.arange(len(source)), batch_size):
            gallery.append(features(batch["images"]).float().cpu())
            labels.append(batch["targets"])
        gallery, labels = torch.cat(gallery), torch.cat(labels)
        queries = []
        for start in range(0, pairs, batch_size):
            views = model.translate(next(_batches(source, src[start:start + batch_size], pairs)),
                                    next(_batches(target, tgt[start:start + batch_size], pairs)))
            queries.append(features((views["x_sg"] + 1.0) * 127.5).float().cpu())
        distances = torch.cdist(torch.cat(queries), gallery)
        rows = torch.arange(pairs)
        own = torch.as_tensor(src)
        distances[rows, own] = float("inf")  # not the image the view was generated from
        wanted = labels[own]
        hits = labels[distances.argmin(dim=1)] == wanted
        same = (labels[None, :] == wanted[:, None]).sum(dim=1) - 1
        chance = same.float() / (len(labels) - 1)
        return {"rank1": 100.0 * hits.float().mean().item(),
                "chance": 100.0 * chance.mean().item(), "pairs": int(pairs)}
    finally:
        model.train(was_training)
