"""ImageNet weights from MODEL.BACKBONE.PRETRAIN_PATH into a backbone, all or nothing.

fastreid's builders load them with ``strict=False`` and only log what did not fit, so a file of
another layout (or a whole checkpoint instead of a state dict) silently leaves a randomly initialised
backbone that then trains with the paper's recipe. Here every backbone tensor must come from the
file with its shape; the file's classifier (which a backbone does not have) is skipped.
"""
import torch

from ...config import ConfigError

# ImageNet classifiers of the weight files we read (torchvision's ``classifier``, the common
# BN-Inception conversion's ``last_linear``, ``fc`` of ResNet-style files).
CLASSIFIER_PREFIXES = ("classifier.", "last_linear.", "fc.")


def read_state_dict(path):
    """The tensors of a state-dict file (torch.load, weights_only), or a ConfigError naming it."""
    label = f"MODEL.BACKBONE.PRETRAIN_PATH {path}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{label}: file not found") from None
    except Exception as e:  # torch.load raises many types for files that are not state dicts
        raise ConfigError(f"{label} cannot be read as a state dict: "
                          f"{str(e).splitlines()[0]}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        keys = list(state)[:3] if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"{label} is not a state dict of tensors (found {keys}); give the "
                          f"ImageNet weights' state dict itself")
    return state


def load_pretrained(model, path, convert=None):
    """Load the state dict at ``path`` into ``model`` (through ``convert(state)`` -> a state dict in
    the model's layout, when given). Every tensor of the model but BatchNorm's ``num_batches_tracked`` counters must be in
    the file with its shape, and the file may hold nothing else but an ImageNet classifier:
    otherwise a ConfigError names the first offending key."""
    if not path:
        raise ConfigError(f"{type(model).__name__}: MODEL.BACKBONE.PRETRAIN True needs "
                          f"MODEL.BACKBONE.PRETRAIN_PATH (its ImageNet state dict; nothing is "
                          f"downloaded), or set MODEL.BACKBONE.PRETRAIN False")
    label = f"MODEL.BACKBONE.PRETRAIN_PATH {path}"
    state = read_state_dict(path)
    state = {k: v for k, v in (convert(state) if convert else state).items()
             if not k.startswith(CLASSIFIER_PREFIXES)}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    for keys, what in ((missing, "is missing from the file"), (extra, "is not a backbone tensor"),
                       (wrong, "has another shape in the file")):
        if keys:
            shape = f" ({tuple(state[keys[0]].shape)} vs {tuple(own[keys[0]].shape)})" \
                if keys is wrong else ""
            raise ConfigError(f"{label} does not fit {type(model).__name__}: {keys[0]} {what}"
                              f"{shape} ({len(keys)} such tensor(s))")
    model.load_state_dict(state, strict=False)  # strict=False: old files lack num_batches_tracked
    return model
