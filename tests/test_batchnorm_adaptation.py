"""AdaBN (robustreid.modeling.batchnorm_adaptation): the uda_eval baseline row."""
import pytest
import torch
from torch import nn

from robustreid.modeling.batchnorm_adaptation import adapt_batchnorm_statistics


class TinyReID(nn.Module):
    """conv -> BN -> pooled feature; training forward would need targets, as fastreid's do."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.BatchNorm1d(2)

    def forward(self, batched_inputs):
        if self.training:
            raise AssertionError("the eval forward must be used")
        x = self.bn(self.conv(batched_inputs["images"]))
        return self.head(x.mean((2, 3)))


def test_statistics_are_those_of_the_target_images_and_weights_do_not_move():
    torch.manual_seed(0)
    model = TinyReID().eval()
    with torch.no_grad():
        model.conv.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2.0, 0]]).view(2, 3, 1, 1))
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    images = torch.randn(8, 3, 4, 2) * 3 + 5
    assert adapt_batchnorm_statistics(model, [images[:4], images[4:]]) == 8
    # conv channel 0 = image channel 0, channel 1 = 2 x image channel 1; two equal batches, so the
    # running mean is the mean over all pixels of all 8 images
    expected_mean = torch.stack([images[:, 0].mean(), 2 * images[:, 1].mean()])
    assert torch.allclose(model.bn.running_mean, expected_mean, atol=1e-5)
    # running variance: the average of the two batches' unbiased variances (PyTorch's cumulative
    # average with momentum None)
    conv = torch.stack([images[:, 0], 2 * images[:, 1]], 1)
    batch_vars = [conv[s].transpose(0, 1).reshape(2, -1).var(1) for s in (slice(0, 4), slice(4, 8))]
    assert torch.allclose(model.bn.running_var, (batch_vars[0] + batch_vars[1]) / 2, atol=1e-4)
    assert model.head.running_mean.abs().max() < 1e-5  # the BN output feeds the head: ~0 mean
    for k, v in weights.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.training and not model.bn.training
    assert model.bn.momentum == 0.1 and model.head.momentum == 0.1


def test_a_failure_or_no_image_leaves_the_old_statistics():
    model = TinyReID().eval()
    model.bn.running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing():
        yield torch.randn(2, 3, 4, 2)
        raise OSError("unreadable image")

    with pytest.raises(OSError):
        adapt_batchnorm_statistics(model, failing())
    with pytest.raises(ValueError, match="no target image"):
        adapt_batchnorm_statistics(model, [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.bn.momentum == 0.1 and not model.bn.training
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm_statistics(nn.Sequential(nn.Linear(2, 2)), [torch.zeros(1, 2)])
