"""AdaBN (Li et al., "Revisiting Batch Normalization for Practical Domain Adaptation", 2016): a
source-trained model adapted to a target domain by re-estimating every BatchNorm layer's running
statistics on unlabelled target images, weights unchanged. The cheapest UDA baseline: a UDA method
should beat it, not only direct transfer (tools/uda_eval.py prints both rows).
"""
import torch
from torch import nn

__all__ = ["adapt_batchnorm_statistics"]


@torch.no_grad()
def adapt_batchnorm_statistics(model, batches):
    """Replace the running mean / variance of every BatchNorm layer of ``model`` (in place) by
    their averages over ``batches`` (image tensors, as the model's eval forward takes them in
    ``{"images": x}``); returns the number of images seen.

    The rest of the model stays in eval mode (fastreid's meta-architectures return features, not
    losses), and PyTorch's cumulative averaging (momentum None) weighs every batch equally, so
    equal-sized batches give the statistics of all the images. Modes and momenta are restored, and
    on failure (or no image) the old statistics too."""
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        raise ValueError("adapt_batchnorm_statistics: the model has no BatchNorm layer with "
                         "running statistics")
    was_training = model.training
    momenta = [m.momentum for m in layers]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
        layer.train()
    seen = 0
    try:
        for images in batches:
            model({"images": images})
            seen += len(images)
        if not seen:
            raise ValueError("adapt_batchnorm_statistics: no target image was given")
    except BaseException:
        for layer, state in zip(layers, saved):
            layer.load_state_dict(state)
        raise
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.train(was_training)
    return seen
