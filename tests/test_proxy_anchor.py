"""Proxy-Anchor loss (EAT's metric loss): pml's value against a hand computation of the equation,
the model's loss dict, the proxies' learning rate, the backbone warm-up (also across --resume), the
proxies in checkpoints, and the config checks; the rate and the warm-up also for every member of an
EAT ensemble."""
import math

import pytest
import torch

import robustreid  # noqa: F401  (compat patches + registrations)
from fastreid.engine.hooks import HookBase
from fastreid.utils.events import EventStorage

from conftest import make_tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

PA = ("MODEL.META_ARCHITECTURE", "RobustBaseline",
      "MODEL.LOSSES.NAME", "('CrossEntropyLoss', 'TripletLoss', 'ProxyAnchorLoss')")
WITHOUT_PA = ("MODEL.META_ARCHITECTURE", "RobustBaseline",
              "MODEL.LOSSES.NAME", "('CrossEntropyLoss', 'TripletLoss')")
# an EAT ensemble of two RobustBaseline members with the loss (one PGD step: cheap)
EAT_PA = (*PA, "MODEL.META_ARCHITECTURE", "EnsembleReID", "EAT.ENABLED", "True", "EAT.MEMBERS", "2",
          "EAT.STEPS", "1")
MEMBERS = ("members.0.", "members.1.")


def proxy_anchor_by_hand(embeddings, labels, proxies, alpha, delta):
    """Kim et al. eq.: (1/|P+|) sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x,p) - delta)))
    + (1/|P|) sum_{p in P} log(1 + sum_{x in X_p-} exp(alpha (s(x,p) + delta))), s = cosine."""
    def cos(u, v):
        return (u[0] * v[0] + u[1] * v[1]) / (math.hypot(*u) * math.hypot(*v))

    with_positives = [c for c in range(len(proxies)) if c in labels]
    pos = sum(math.log(1 + sum(math.exp(-alpha * (cos(x, proxies[c]) - delta))
                               for x, y in zip(embeddings, labels) if y == c))
              for c in with_positives) / len(with_positives)
    neg = sum(math.log(1 + sum(math.exp(alpha * (cos(x, proxies[c]) + delta))
                               for x, y in zip(embeddings, labels) if y != c))
              for c in range(len(proxies))) / len(proxies)
    return pos + neg


# Four 2-D embeddings (not unit length: the loss normalises), two of class 0, two of class 1;
# class 2 has no sample in the batch (P+ = {0, 1}, P = {0, 1, 2}).
EMBEDDINGS = [(1.0, 0.0), (3.0, 1.0), (0.0, 2.0), (-1.0, 1.0)]
LABELS = [0, 0, 1, 1]
PROXIES = [(2.0, 0.0), (0.0, 1.0), (-1.0, -1.0)]


@pytest.mark.parametrize("alpha, delta, scale", [(32.0, 0.1, 1.0), (4.0, 0.3, 2.5)])
def test_loss_is_the_equation_computed_by_hand(alpha, delta, scale):
    from robustreid.modeling.losses import ProxyAnchor

    loss = ProxyAnchor(3, 2, margin=delta, alpha=alpha, scale=scale)
    with torch.no_grad():
        loss.proxies.copy_(torch.tensor(PROXIES))
    value = loss(torch.tensor(EMBEDDINGS), torch.tensor(LABELS))
    expected = scale * proxy_anchor_by_hand(EMBEDDINGS, LABELS, PROXIES, alpha, delta)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_half_precision_features_leave_the_proxies_float32():
    from robustreid.modeling.losses import ProxyAnchor

    loss = ProxyAnchor(3, 2)
    value = loss(torch.tensor(EMBEDDINGS, dtype=torch.bfloat16), torch.tensor(LABELS))
    assert loss.proxies.dtype == torch.float32 and value.dtype == torch.float32


def build_model(cfg, seed=0):
    from fastreid.modeling.meta_arch import build_model

    torch.manual_seed(seed)
    return build_model(cfg)


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.rand(8, 3, 64, 32, generator=g) * 255,
            "targets": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])}


@pytest.mark.parametrize("head", [(), ("MODEL.HEADS.EMBEDDING_DIM", "64",
                                       "MODEL.HEADS.NECK_FEAT", "after")],
                         ids=["pooled_feature", "embedding_layer"])
def test_model_adds_loss_proxy_anchor_on_the_features_and_nothing_else(head, tmp_path):
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    opts = ("MODEL.HEADS.NUM_CLASSES", "6", *head)
    plain = build_model(make_tiny_cfg(tmp_path, *WITHOUT_PA, *opts)).train()
    with_pa = build_model(make_tiny_cfg(tmp_path, *PA, *opts, "MODEL.LOSSES.PA.MARGIN", "0.2",
                                        "MODEL.LOSSES.PA.ALPHA", "16.0", "MODEL.LOSSES.PA.SCALE",
                                        "0.5")).train()
    with EventStorage(0):
        plain_losses = plain(batch())
        losses, outputs = with_pa(batch(), return_outputs=True)
    # without the name: no proxies, and the model and its losses are those of the same seed's
    # model with the name, minus the Proxy-Anchor parts
    assert plain.proxy_anchor is None
    state = with_pa.state_dict()
    assert set(state) - set(plain.state_dict()) == {"proxy_anchor.loss.proxies"}
    assert all(torch.equal(t, state[k]) for k, t in plain.state_dict().items())
    assert set(losses) - set(plain_losses) == {"loss_proxy_anchor"}
    assert all(torch.equal(plain_losses[k], losses[k]) for k in plain_losses)
    # with it: SCALE x pml's loss (MARGIN, ALPHA) on outputs["features"], one proxy per class
    proxies = with_pa.proxy_anchor.proxies
    assert proxies.shape == (6, outputs["features"].shape[1])
    reference = ProxyAnchorLoss(6, proxies.shape[1], margin=0.2, alpha=16)
    reference.proxies.data.copy_(proxies.detach())
    expected = 0.5 * reference(outputs["features"].detach(), batch()["targets"])
    assert losses["loss_proxy_anchor"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["loss_proxy_anchor"].backward()  # trains the proxies and the network
    for trained in (proxies, with_pa.backbone.conv1.weight):
        assert trained.grad is not None and trained.grad.abs().sum() > 0


@pytest.mark.parametrize("opts, models", [(PA, ("",)), (EAT_PA, MEMBERS)],
                         ids=["single", "ensemble"])
def test_proxies_learn_at_100_times_base_lr_under_every_scheduler(opts, models, tmp_path):
    from robustreid.engine import RobustTrainer, preflight

    cfg = make_tiny_cfg(tmp_path, *opts, "MODEL.HEADS.NUM_CLASSES", "6", "SOLVER.WARMUP_ITERS", "4")
    preflight(cfg)  # an ensemble of RobustBaselines builds the loss: accepted
    model = RobustTrainer.build_model(cfg)
    optimizer, _ = RobustTrainer.build_optimizer(cfg, model)
    schedulers = RobustTrainer.build_lr_scheduler(cfg, optimizer, 3)
    params = dict(model.named_parameters())

    def group_of(name):
        return next(g for g in optimizer.param_groups if any(p is params[name] for p in g["params"]))

    # every model's proxies (each member's own), against a backbone weight
    proxies = [group_of(f"{m}proxy_anchor.loss.proxies") for m in models]
    conv = group_of(f"{models[0]}backbone.conv1.weight")
    assert [g["initial_lr"] for g in proxies] == pytest.approx([cfg.SOLVER.BASE_LR * 100] * len(models))
    rates = []
    for _epoch in range(3):  # fastreid's hook: warm-up per iteration, main schedule per epoch
        for _ in range(3):
            rates.append(([g["lr"] for g in proxies], conv["lr"]))
            optimizer.step()  # no gradients: changes nothing; as in training, before the schedulers
            schedulers["warmup_sched"].step()
        schedulers["lr_sched"].step()
    assert len({conv_lr for _, conv_lr in rates}) > 2  # warm-up and step decay both changed it
    assert all(p == pytest.approx(100 * c) for ps, c in rates for p in ps)


class Snapshots(HookBase):
    """The model's trainable parameters before training and at each epoch end, and which backbone
    parameters have optimizer state then."""

    def __init__(self):
        self.params, self.stateful = [], []

    def _take(self):
        model = self.trainer.model
        self.params.append({k: v.detach().clone() for k, v in model.named_parameters()
                            if k in self.trainable})
        state = self.trainer.optimizer.state
        self.stateful.append([len(state[p]) > 0 for k, p in model.named_parameters()
                              if "backbone." in k])

    def before_train(self):
        self.trainable = {k for k, v in self.trainer.model.named_parameters() if v.requires_grad}
        self._take()

    def after_epoch(self):
        self._take()


def moved(before, after, prefix):
    """Whether each parameter under ``prefix`` changed."""
    return [not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)]


def trainer(cfg, resume=False, hooks=()):
    from fastreid.utils.env import seed_all_rng

    from robustreid.engine import RobustTrainer

    seed_all_rng(0)
    built = RobustTrainer(cfg)
    built.register_hooks(list(hooks))
    built.resume_or_load(resume=resume)
    return built


@pytest.mark.parametrize("opts, models", [(PA, ("",)), (EAT_PA, MEMBERS)],
                         ids=["single", "ensemble"])
def test_backbone_is_frozen_in_the_warmup_epoch_and_trains_after_it(opts, models, tmp_path,
                                                                    datasets_root):
    snapshots = Snapshots()
    run = trainer(make_tiny_cfg(tmp_path, *opts, "TEST.EVAL_PERIOD", "100",
                                "MODEL.LOSSES.PA.WARMUP_EPOCHS", "1"), hooks=[snapshots])
    run.train()
    start, warmed, trained = snapshots.params
    for m in models:  # every member's backbone
        assert not any(moved(start, warmed, f"{m}backbone."))
        assert all(moved(start, warmed, f"{m}heads.")) and all(moved(start, warmed,
                                                                     f"{m}proxy_anchor."))
        assert all(moved(warmed, trained, f"{m}backbone."))
    assert len(snapshots.stateful[1]) > 0 and not any(snapshots.stateful[1])  # no Adam moments or
    # steps for a frozen backbone
    # released after training: trainable as built
    assert {k for k, p in run.model.named_parameters() if p.requires_grad} == snapshots.trainable


def test_without_warmup_the_backbone_trains_from_the_first_epoch(tmp_path, datasets_root):
    snapshots = Snapshots()
    trainer(make_tiny_cfg(tmp_path, *PA, "TEST.EVAL_PERIOD", "100", "SOLVER.MAX_EPOCH", "1",
                          "MODEL.LOSSES.PA.WARMUP_EPOCHS", "0"), hooks=[snapshots]).train()
    assert all(moved(*snapshots.params, "backbone."))


class StopInEpoch(HookBase):
    def __init__(self, epoch):
        self.epoch = epoch

    def after_step(self):
        if self.trainer.epoch == self.epoch:
            raise KeyboardInterrupt


def test_a_run_resumed_after_the_warmup_trains_its_backbone_as_the_uninterrupted_one(
        tmp_path, datasets_root):
    opts = (*PA, "TEST.EVAL_PERIOD", "100", "SOLVER.CHECKPOINT_PERIOD", "5",
            "MODEL.LOSSES.PA.WARMUP_EPOCHS", "1")
    trainer(make_tiny_cfg(tmp_path / "straight", *opts)).train()
    stopped = trainer(make_tiny_cfg(tmp_path / "stopped", *opts), hooks=[StopInEpoch(1)])
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    resumed = trainer(make_tiny_cfg(tmp_path / "stopped", *opts), resume=True)
    assert resumed.start_epoch == 1
    resumed.train()
    boundary, straight, final = (torch.load(path, weights_only=True) for path in (
        tmp_path / "stopped" / "model_0000.pth", tmp_path / "straight" / "model_final.pth",
        tmp_path / "stopped" / "model_final.pth"))
    assert all(moved(boundary["model"], final["model"], "backbone."))
    assert straight["model"].keys() == final["model"].keys()
    assert all(torch.equal(straight["model"][k], final["model"][k]) for k in straight["model"])


def test_checkpointer_saves_and_restores_the_proxies(tmp_path):
    from robustreid.engine import RobustCheckpointer

    cfg = make_tiny_cfg(tmp_path, *PA, "MODEL.HEADS.NUM_CLASSES", "6")
    saved = build_model(cfg, seed=0)
    RobustCheckpointer(saved, str(tmp_path)).save("pa")
    restored = build_model(cfg, seed=1)
    assert not torch.equal(saved.proxy_anchor.proxies, restored.proxy_anchor.proxies)
    RobustCheckpointer(restored).load(str(tmp_path / "pa.pth"))
    assert torch.equal(saved.proxy_anchor.proxies, restored.proxy_anchor.proxies)


@pytest.mark.parametrize("opts, key", [
    (("MODEL.LOSSES.PA.MARGIN", "-0.1"), "MODEL.LOSSES.PA.MARGIN"),
    (("MODEL.LOSSES.PA.ALPHA", "0.0"), "MODEL.LOSSES.PA.ALPHA"),
    (("MODEL.LOSSES.PA.LR_MULTIPLIER", "0.0"), "MODEL.LOSSES.PA.LR_MULTIPLIER"),
    (("MODEL.LOSSES.PA.WARMUP_EPOCHS", "-1"), "MODEL.LOSSES.PA.WARMUP_EPOCHS"),
    (("MODEL.META_ARCHITECTURE", "Baseline"), "needs MODEL.META_ARCHITECTURE RobustBaseline"),
    (EAT_PA[len(PA):] + ("EAT.MEMBER_ARCHITECTURE", "Baseline"),
     "needs EAT.MEMBER_ARCHITECTURE RobustBaseline .* got 'Baseline'"),
])
def test_bad_values_stop_the_run_before_training_naming_the_key(opts, key, tmp_path):
    from robustreid.config import ConfigError
    from robustreid.engine import preflight

    from robustreid.modeling.losses import check_proxy_anchor_config

    with pytest.raises(ConfigError, match=key):
        preflight(make_tiny_cfg(tmp_path, *PA, *opts))  # before any dataset is read
    if key.startswith("MODEL.LOSSES.PA."):  # keys of a loss that is not named are not checked
        check_proxy_anchor_config(make_tiny_cfg(tmp_path, *WITHOUT_PA, *opts))


def test_the_loss_refuses_num_classes_0_naming_the_key(tmp_path):
    # NUM_CLASSES 0 is fastreid's "count the training set's identities" (RobustTrainer does), so
    # configs may hold it; a loss built from one cannot be computed.
    from robustreid.config import ConfigError
    from robustreid.modeling.losses import ProxyAnchor

    loss = ProxyAnchor.from_config(make_tiny_cfg(tmp_path, *PA, "MODEL.HEADS.NUM_CLASSES", "0"))
    with pytest.raises(ConfigError, match="MODEL.HEADS.NUM_CLASSES is 0"):
        loss(torch.tensor(EMBEDDINGS), torch.tensor(LABELS))
