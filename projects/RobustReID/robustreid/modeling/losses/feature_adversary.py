"""Adversarially-enhanced learning (DDDefense eq. 6-8): a discriminator D on features tells clean
from adversarial; the encoder E is trained to confuse it.

D outputs a logit; D(f) = sigmoid(logit) is the probability that f comes from a clean image. The
paper does not specify D's architecture: ``FeatureDiscriminator`` is a small MLP with LeakyReLU, as
feature-level discriminators usually are (hidden sizes in ADV_TRAIN.DISCRIMINATOR.HIDDEN_DIMS).
"""
import torch.nn as nn
import torch.nn.functional as F


class FeatureDiscriminator(nn.Module):
    """MLP feature -> clean-vs-adversarial logit."""

    def __init__(self, in_dim, hidden_dims=(512, 256)):
        super().__init__()
        layers, dim = [], in_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(dim, hidden), nn.LeakyReLU(0.2, inplace=True)]
            dim = hidden
        layers.append(nn.Linear(dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features):
        return self.net(features).squeeze(1)


def discriminator_loss(logits, is_adversarial):
    """L_D (eq. 6) = -E_x[log D(E(x))] - E_xadv[log(1 - D(E(xadv)))], each expectation over its own
    samples (log-sigmoid form for numerical stability)."""
    clean = ~is_adversarial
    return -(F.logsigmoid(logits[clean]).mean() + F.logsigmoid(-logits[is_adversarial]).mean())


def encoder_confusion_loss(logits, is_adversarial):
    """L_E (eq. 7) = E_x[log D(E(x))] + E_xadv[log(1 - D(E(xadv)))] = -L_D: minimising it moves the
    encoder's features to where D cannot tell clean from adversarial (the min-max of eq. 8)."""
    return -discriminator_loss(logits, is_adversarial)
