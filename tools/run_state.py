"""Where a training run stands, read from its OUTPUT_DIR (the files fastreid's checkpointer
writes): the resumable-skipping rules of the tools that orchestrate trainings
(reproduce_dddefense.py, evidence.py). Only ``os``: those tools plan without importing torch."""
import os


def final_weights(output_dir):
    """The weights a finished run leaves; the run is done once this file exists."""
    return os.path.join(output_dir, "model_final.pth")


def resume_flags(output_dir):
    """tools/train_net.py's ``--resume`` when the run has a checkpoint to continue from, else []."""
    return ["--resume"] if os.path.isfile(os.path.join(output_dir, "last_checkpoint")) else []
