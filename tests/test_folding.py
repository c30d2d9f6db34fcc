"""BatchNorm folding for attack forwards: same features and input gradients, never stale."""
import pytest
import torch

from conftest import make_tiny_cfg


def _model(tmp_path, *opts):
    from fastreid.modeling.meta_arch import build_model

    cfg = make_tiny_cfg(tmp_path, "MODEL.BACKBONE.PRETRAIN", "False", *opts)
    cfg.MODEL.HEADS.NUM_CLASSES = 4
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        _train_losses(model)
    return model


def _train_losses(model):
    from fastreid.utils.events import EventStorage

    with EventStorage(0):
        return model({"images": torch.rand(8, 3, 64, 32) * 255,
                      "targets": torch.arange(4).repeat(2)})


@pytest.mark.parametrize("opts", [(), ("MODEL.BACKBONE.WITH_IBN", "True")])
def test_folded_model_matches_features_and_input_gradients(tmp_path, opts):
    import torch.nn as nn

    from robustreid.attacks import ReidFeatureExtractor
    from robustreid.attacks.folding import FoldedModel

    model = _model(tmp_path, *opts)
    x = torch.rand(4, 3, 64, 32)
    outputs = {}
    for fold in (False, True):
        extractor = ReidFeatureExtractor(model, fold_bn=fold)
        point = x.clone().requires_grad_(True)
        features = extractor(point)
        grad, = torch.autograd.grad(features.pow(2).sum(), point)
        outputs[fold] = features.detach(), grad
    assert torch.allclose(outputs[True][0], outputs[False][0], rtol=1e-4, atol=1e-4)
    grad_error = (outputs[True][1] - outputs[False][1]).abs().max()
    assert grad_error <= 1e-4 * outputs[False][1].abs().max()  # float rounding only
    assert model.training  # the caller's model is untouched
    def count_bn(m):
        return sum(isinstance(module, nn.BatchNorm2d) for module in m.modules())

    before = count_bn(model)
    folded = FoldedModel(model.eval()).module
    assert count_bn(folded) < before and count_bn(model) == before  # folded in the copy only


def test_fold_is_built_once_and_refreshed_from_the_live_weights(tmp_path, monkeypatch):
    import copy as copy_module

    from robustreid.attacks import ReidFeatureExtractor

    model = _model(tmp_path)
    extractor = ReidFeatureExtractor(model)
    x = torch.rand(4, 3, 64, 32)
    with extractor.frozen_eval():
        first = extractor(x)
        copy = extractor.eval_model()
        extractor(x)
        assert extractor.eval_model() is copy  # one fold per block
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    _train_losses(model)["loss_cls"].backward()
    optimizer.step()
    with torch.no_grad():
        _train_losses(model)  # running statistics move too
    deep_copies = []
    monkeypatch.setattr(copy_module, "deepcopy", lambda *a, **k: deep_copies.append(a))
    with extractor.frozen_eval():
        after = extractor(x)
        assert extractor.eval_model() is copy  # the same copy, refreshed in place ...
    assert not deep_copies  # ... never deep-copied again
    monkeypatch.undo()
    reference = ReidFeatureExtractor(model, fold_bn=False)(x)
    assert not torch.allclose(after, first)  # the new weights are used ...
    # ... and folded correctly. After an lr-1 step features reach ~1e4: float rounding scales with
    # them (elementwise rtol fails on the small entries, measured 8e-4 on one CPU), a stale fold
    # would be off by O(1) of the scale.
    error = (after - reference).abs().max()
    assert error <= 1e-5 * reference.abs().max()
    assert all(not p.requires_grad for p in copy.parameters())
    conv_weights = [m.weight for m in copy.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)


def test_training_attack_phase_keeps_one_extractor_across_steps(tmp_path):
    from robustreid.engine.train_steps import MetricAdversarialBatch

    model = _model(tmp_path)
    phase = MetricAdversarialBatch("FNA", eps=5, steps=1, step_size=0, distance="euclidean",
                                   include_clean=False)
    batch = {"images": torch.rand(8, 3, 64, 32) * 255, "targets": torch.arange(4).repeat(2),
             "camids": torch.zeros(8, dtype=torch.long)}
    flags = [p.requires_grad for p in model.parameters()]
    phase(model, dict(batch))
    extractor = phase.extractor(model)
    phase(model, dict(batch))
    assert phase.extractor(model) is extractor and len(extractor._folded) == 1
    assert model.training and [p.requires_grad for p in model.parameters()] == flags


def test_models_with_forward_hooks_are_not_folded(tmp_path):
    from robustreid.attacks import ReidFeatureExtractor

    model = _model(tmp_path)
    model.backbone.layer1.register_forward_hook(lambda m, i, o: o)
    extractor = ReidFeatureExtractor(model)
    with extractor.frozen_eval():
        assert extractor.eval_model() is model
