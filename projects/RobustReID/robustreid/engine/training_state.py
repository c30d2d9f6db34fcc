"""What a checkpoint holds beyond the model and the optimizers so that a resumed run continues
exactly as the uninterrupted run would: every process's random generators and where its training
batch stream stands (robustreid.data.train_stream)."""
import logging

from fastreid.utils import comm

from .. import rng_state

logger = logging.getLogger(__name__)


class TrainingState:
    """A checkpointable (``training_state`` in checkpoints).

    :meth:`capture` is collective (every rank calls it, at an epoch boundary); checkpoints then hold
    every rank's state, written by the main process. :meth:`load_state_dict` positions the stream
    at once and keeps the generator states for :meth:`restore_generators`, which the trainer calls
    once training is set up, right before the first epoch: set-up work that draws random numbers
    (building hooks, initialising BAU's memory) must not shift the streams.
    """

    def __init__(self, stream):
        self.stream = stream
        self._captured = {}
        self._pending = None

    def capture(self):
        mine = {"rng": rng_state.capture(), "stream": self.stream.state_dict()}
        self._captured = {"ranks": comm.all_gather(mine)}

    def state_dict(self):
        return self._captured

    def load_state_dict(self, state):
        ranks = state.get("ranks", [])
        if len(ranks) != comm.get_world_size():
            logger.warning("The checkpoint's training state is of %d process(es), this run has %d: "
                           "the random streams and the data order start afresh", len(ranks),
                           comm.get_world_size())
            return
        mine = ranks[comm.get_rank()]
        self.stream.load_state_dict(mine["stream"])
        self._pending = mine["rng"]

    def restore_generators(self):
        if self._pending is not None:
            rng_state.restore(self._pending)
            self._pending = None
