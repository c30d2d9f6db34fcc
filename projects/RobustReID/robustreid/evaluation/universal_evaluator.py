"""Universal adversarial perturbations (:mod:`robustreid.attacks.universal`) in robust evaluation.

Each cell (:class:`UAPCell`: budget, fitting steps) learns one perturbation on the training images
of DATASETS.NAMES (test transforms, so it has the queries' size; seeded shuffle, batches of
TEST.IMS_PER_BATCH), on the evaluator's attack model (a surrogate with ``surrogate``: transfer), and
adds it to every test query, ranked against the clean gallery (:meth:`RobustEvaluator.evaluate_attack`,
budget checked batch by batch).
"""
from dataclasses import dataclass

import torch
from fastreid.data.build import fast_batch_collator
from fastreid.data.common import CommDataset
from fastreid.data.transforms import build_transforms
from torch.utils.data import DataLoader

from ..attacks.universal import UniversalPerturbation
from ..data.validation import build_dataset
from .attack_grid import format_eps
from .robust import RobustEvaluator

ATTACK = "UAP"


@dataclass(frozen=True)
class UAPCell:
    """One column: a universal perturbation of budget ``eps`` (1/255) fitted in ``steps`` steps."""

    eps: float
    steps: int
    attack: str = ATTACK

    @property
    def key(self):
        return f"{ATTACK}_{format_eps(self.eps)}_{self.steps}"

    @property
    def label(self):
        """E.g. ``UAP 8/255-100``."""
        return f"{ATTACK} {format_eps(self.eps)}/255-{self.steps}"


def training_items(cfg):
    """The training images of every DATASETS.NAMES set (what the perturbation is learned on)."""
    return [item for name in cfg.DATASETS.NAMES for item in build_dataset(name).train]


class UAPEvaluator(RobustEvaluator):
    """:class:`RobustEvaluator` whose cells are :class:`UAPCell`: one perturbation per cell, learned
    on training images, added to every query."""

    def __init__(self, cfg, model, dataset_name, *, max_queries=0, seed=0, progress=True,
                 surrogate=None, step_size=None, distance="euclidean"):
        super().__init__(cfg, model, dataset_name, max_queries=max_queries, seed=seed,
                         progress=progress, surrogate=surrogate, step_size=step_size,
                         distance=distance)
        self.train_items = training_items(cfg)

    def training_batches(self):
        """Endless [0, 1] training batches, epoch after epoch, each in a seeded shuffled order."""
        dataset = CommDataset(self.train_items, build_transforms(self.cfg, is_train=False),
                              relabel=True)
        loader = DataLoader(dataset, batch_size=self.cfg.TEST.IMS_PER_BATCH, shuffle=True,
                            generator=torch.Generator().manual_seed(self.seed),
                            num_workers=self.cfg.DATALOADER.NUM_WORKERS,
                            collate_fn=fast_batch_collator)
        while True:
            for batch in loader:
                yield self._x01(batch)

    def evaluate_cell(self, cell, **attack_kwargs):
        self._seed()
        uap = UniversalPerturbation(self.attack_extractor, eps=cell.eps, steps=cell.steps,
                                    step_size=self.step_size, distance=self.distance)
        uap.fit(self.training_batches())
        return {**self.evaluate_attack(uap, cell), **uap.fit_stats,
                "training_images": len(self.train_items)}
