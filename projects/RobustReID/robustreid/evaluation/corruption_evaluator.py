"""Retrieval under common corruptions (CIL-ReID's protocol, images from
:mod:`robustreid.data.corruptions`): each (corruption, severity) cell corrupts the query and gallery
images (``corrupt="both"``, CIL-ReID's "corrupted eval"), or one side only ("query" / "gallery", its
other two evaluations), and ranks them with the usual Market-1501 rules; the :data:`MIXED` cell draws
a corruption and a severity per image (CIL-ReID's headline number). Each dataset entry carries its
:func:`corruption_summary` (CIL-ReID's averages).

The clean features, the query subset (``max_queries``), the scoring and the chance level are
:class:`RobustEvaluator`'s, so a clean row here is the adversarial report's clean row.
"""
import logging
import time

import torch
from fastreid.data.build import fast_batch_collator
from fastreid.data.transforms import build_transforms
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.corruptions import MIXED, CorruptedImages
from .corruption_report import corruption_summary
from .robust import RobustEvaluator, chance_level

logger = logging.getLogger(__name__)

CORRUPTED_SIDES = ("both", "query", "gallery")


class CorruptionEvaluator(RobustEvaluator):
    """Clean and corrupted retrieval metrics of one model on one test dataset."""

    def __init__(self, cfg, model, dataset_name, *, corrupt="both", max_queries=0, seed=0,
                 progress=True):
        if corrupt not in CORRUPTED_SIDES:
            raise ValueError(f"corrupt must be one of {CORRUPTED_SIDES}, got {corrupt!r}")
        super().__init__(cfg, model, dataset_name, max_queries=max_queries, seed=seed,
                         progress=progress)
        self.corrupt = corrupt

    def _corrupted_features(self, split, corruption, severity):
        dataset = CorruptedImages(split.items, build_transforms(self.cfg, is_train=False),
                                  corruption, severity, self.seed, split.name)
        loader = DataLoader(dataset, batch_size=self.cfg.TEST.IMS_PER_BATCH, shuffle=False,
                            num_workers=self.cfg.DATALOADER.NUM_WORKERS,
                            collate_fn=fast_batch_collator)
        batches = tqdm(loader, desc=f"{self.dataset_name} {split.name} {corruption} {severity or ''}",
                       unit="batch", disable=not self.progress, dynamic_ncols=True)
        with torch.no_grad(), self.extractor.frozen_eval():
            self._seed()  # stochastic models draw the same noise as for the clean features
            return torch.cat([self._retrieval_features(self.extractor, self._x01(batch))
                              for batch in batches])

    def evaluate_corruption(self, corruption, severity=None):
        """Metrics with ``corruption`` at ``severity`` (None for :data:`MIXED`) on the corrupted
        side(s), the other side clean."""
        self.evaluate_clean()
        start = time.perf_counter()
        query, gallery = self.query.features, self.gallery.features
        if self.corrupt in ("both", "query"):
            query = self._corrupted_features(self.query, corruption, severity)
        if self.corrupt in ("both", "gallery"):
            gallery = self._corrupted_features(self.gallery, corruption, severity)
        seconds = time.perf_counter() - start
        result = {"corruption": corruption, "severity": severity, "seconds": seconds,
                  **self._score(query, gallery)}
        logger.info("%s %s %s: mAP %.2f Rank-1 %.2f (clean %.2f / %.2f), %.1f s",
                    self.dataset_name, corruption, severity or "", result["mAP"], result["Rank-1"],
                    self.clean["mAP"], self.clean["Rank-1"], seconds)
        return result

    def run(self, corruptions, severities, mixed=True):
        """Clean metrics, chance level, every corruption x severity cell (corruption-major) and, with
        ``mixed``, the :data:`MIXED` cell: one dataset's entry of a corruption report."""
        clean = self.evaluate_clean()
        cells = [self.evaluate_corruption(c, s) for c in corruptions for s in severities]
        chance_map, chance_r1 = chance_level(self.query.pids, self.gallery.pids, self.query.camids,
                                             self.gallery.camids, seed=self.seed)
        entry = {
            "dataset": self.dataset_name, "protocol": "corruptions", "corrupted": self.corrupt,
            "num_query": len(self.query.items), "num_gallery": len(self.gallery.items),
            "num_valid_query": int(self._valid.sum()), "metric": self.metric,
            "chance": {"mAP": chance_map, "Rank-1": chance_r1}, "clean": clean,
            "clean_seconds": self.clean_seconds, "cells": cells,
            "mixed": self.evaluate_corruption(MIXED) if mixed else None,
        }
        entry["summary"] = corruption_summary(entry)
        return entry
