"""Optimizer and scheduler of a trainable part that lives outside the model's optimizer (the
feature discriminator, ADIN's nuisance classifier): the model's kind, the part's own rate."""
import torch


def build_part_optimizer(cfg, parameters, base_lr, weight_decay, gamma):
    """SOLVER.OPT over ``parameters`` at ``base_lr`` (0 = SOLVER.BASE_LR) and an epoch-stepped
    MultiStepLR at the model's SOLVER.STEPS decaying by ``gamma``."""
    optimizer_cls = getattr(torch.optim, cfg.SOLVER.OPT)
    kwargs = {"momentum": cfg.SOLVER.MOMENTUM} if cfg.SOLVER.OPT == "SGD" else {}
    optimizer = optimizer_cls(parameters, lr=base_lr or cfg.SOLVER.BASE_LR,
                              weight_decay=weight_decay, **kwargs)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.SOLVER.STEPS), gamma=gamma)
    return optimizer, scheduler
