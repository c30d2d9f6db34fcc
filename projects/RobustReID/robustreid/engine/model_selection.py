"""Robust model selection: keep the checkpoint with the best value of one evaluation result
(TEST.ROBUST.BEST_METRIC, e.g. "FNA_8_16/mAP"), not only the last one."""
import logging
import math
import os

logger = logging.getLogger(__name__)


class BestMetricCheckpoint:
    """Saves ``model_best_robust`` when ``key`` improves; its best value is saved in every
    checkpoint (state_dict), so a resumed run keeps comparing against the right number.

    ``key`` names a flat results entry; with several test datasets prefix it with the dataset
    ("Market1501/FNA_8_16/mAP").
    """

    def __init__(self, key):
        self.key = key
        self.best = -math.inf
        self.best_epoch = -1

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state):
        self.best, self.best_epoch = float(state["best"]), int(state["best_epoch"])

    def lookup(self, results):
        """The value of ``key`` in (possibly dataset-nested) results, or None."""
        if self.key in results and not isinstance(results[self.key], dict):
            return float(results[self.key])
        dataset, _, key = self.key.partition("/")
        nested = results.get(dataset)
        if isinstance(nested, dict) and key in nested:
            return float(nested[key])
        return None

    def update(self, results, checkpointer, epoch):
        if not self.key:
            return
        value = self.lookup(results)
        if value is None:
            logger.info("TEST.ROBUST.BEST_METRIC %r not in this evaluation's results (%s): "
                        "skipped", self.key, ", ".join(sorted(results)))
            return
        if value > self.best:
            self.best, self.best_epoch = value, epoch
            last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else ""
            checkpointer.save("model_best_robust", epoch=epoch, best_metric={self.key: value})
            if last:  # save() tags its file as the last checkpoint: --resume must not pick it
                checkpointer.tag_last_checkpoint(os.path.basename(last))
            logger.info("New best %s = %.2f at epoch %d: saved model_best_robust.pth", self.key,
                        value, epoch)


class PeriodicBestState:
    """fastreid's PeriodicCheckpointer keeps the metric of its model_best.pth in memory only
    (``best_metric``, -1 at start): a resumed run would replace model_best.pth with the next
    evaluated model however bad. As a checkpointable (``periodic_best``) it is saved in every
    checkpoint and restored by --resume."""

    def __init__(self, periodic_checkpointer):
        self.periodic = periodic_checkpointer

    def state_dict(self):
        return {"best_metric": float(self.periodic.best_metric)}

    def load_state_dict(self, state):
        self.periodic.best_metric = float(state["best_metric"])
