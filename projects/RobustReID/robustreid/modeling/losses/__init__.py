"""Loss functions of the domain-generalization methods, BAU (bau.py) and ADIN (adin.py), and the
Proxy-Anchor metric loss (proxy_anchor.py)."""
from .adin import (
    NuisanceHead, calibrated_negative_entropy_loss, focal_entropy_loss, joint_nuisance_labels,
    negative_entropy_loss, nuisance_class_prior, reverse_gradient, reverse_gradient_loss,
)
from .bau import (
    PrototypeMemory, alignment_loss, bau_loss, domain_uniformity_loss,
    kreciprocal_jaccard_weights, two_view_uniformity_loss, uniformity_loss,
)
from .proxy_anchor import ProxyAnchor, check_proxy_anchor_config, proxy_anchor_enabled

__all__ = [
    "NuisanceHead", "calibrated_negative_entropy_loss", "focal_entropy_loss",
    "joint_nuisance_labels", "negative_entropy_loss", "nuisance_class_prior", "reverse_gradient",
    "reverse_gradient_loss",
    "PrototypeMemory", "alignment_loss", "bau_loss", "domain_uniformity_loss",
    "kreciprocal_jaccard_weights", "two_view_uniformity_loss", "uniformity_loss",
    "ProxyAnchor", "check_proxy_anchor_config", "proxy_anchor_enabled",
]
