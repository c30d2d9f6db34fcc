"""Training hooks RobustReID adds to fastreid's defaults."""
import os

from fastreid.engine.hooks import HookBase

from .distributed import average_buffers_across_ranks


class SyncBufferStats(HookBase):
    """Before the epoch-end evaluation and checkpoint, make every rank hold identical buffers."""

    def after_epoch(self):
        average_buffers_across_ranks(self.trainer.model)


class StepSchedulerEachEpoch(HookBase):
    """Steps an epoch-based LR scheduler of a trainable part outside the model (e.g. the feature
    discriminator's) at each epoch end, as fastreid's LRScheduler hook does for the model's."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def after_epoch(self):
        self.scheduler.step()


class EpochBoundary(HookBase):
    """At each epoch end, after the evaluation and just before the periodic checkpoint: every
    rank's generators and data position go into the training state, and the main process keeps the
    whole checkpoint (serialized, in memory) for :meth:`write_last`.

    An interrupted run writes that last boundary: a step cut half-way (Ctrl-C lands anywhere in it,
    between the optimizer's update and the discriminator's, say) cannot be continued exactly, a
    boundary can, and it may be newer than the last periodic checkpoint (SOLVER.CHECKPOINT_PERIOD).
    """

    def __init__(self, training_state, checkpointer):
        self.training_state = training_state
        self.checkpointer = checkpointer
        self.last = None  # (epoch, serialized checkpoint)

    def after_epoch(self):
        self.training_state.capture()
        if self.checkpointer.writes:
            epoch = self.trainer.epoch
            self.last = epoch, self.checkpointer.serialize(epoch=epoch)

    def write_last(self):
        """Write the last boundary of this run as fastreid's model_<epoch>.pth, tagged for --resume;
        its path, or "" when no epoch ended in this run or this process does not write."""
        if self.last is None:
            return ""
        epoch, payload = self.last
        final = epoch >= self.trainer.max_epoch - 1  # named as fastreid's PeriodicCheckpointer would
        name = "model_final" if final else f"model_{epoch:04d}"
        last = self.checkpointer.get_checkpoint_file()
        if os.path.basename(last) == f"{name}.pth":  # the periodic checkpoint of this boundary
            return last
        return self.checkpointer.write(name, payload)
