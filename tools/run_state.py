"""Where a training run stands, read from its OUTPUT_DIR (the files fastreid's checkpointer
writes): the resumable-skipping rules of the tools that orchestrate trainings
(reproduce_dddefense.py, evidence.py). Only the standard library: those tools plan without importing
torch."""
import os
import re


def final_weights(output_dir):
    """The weights a finished run leaves; the run is done once this file exists."""
    return os.path.join(output_dir, "model_final.pth")


def resume_flags(output_dir):
    """tools/train_net.py's ``--resume`` when the run has a checkpoint to continue from, else []."""
    return ["--resume"] if os.path.isfile(os.path.join(output_dir, "last_checkpoint")) else []


INTERMEDIATE_CHECKPOINT = re.compile(r"model_\d{4,}\.pth")  # fastreid's model_<epoch:04d>.pth


def prune_checkpoints(output_dir):
    """Delete a finished run's intermediate checkpoints (model_<epoch>.pth), keeping model_final.pth
    and model_best.pth; a run without model_final.pth is left whole (they are what it resumes
    from). Returns the bytes freed."""
    if not os.path.isfile(final_weights(output_dir)):
        return 0
    freed = 0
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if INTERMEDIATE_CHECKPOINT.fullmatch(name) and os.path.isfile(path):
            freed += os.path.getsize(path)
            os.remove(path)
    return freed
