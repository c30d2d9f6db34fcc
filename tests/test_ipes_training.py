"""IPES-GAN's trainer (issue 16, items 4-5): G, D and E_id each train with their own optimizer and
scheduler, a run stopped mid-way and resumed ends with the uninterrupted run's checkpoint (every
tensor and value), translation grids and the loss terms are written, bad input is one error line."""
import json
import os

import pytest
import torch
from PIL import Image

from robustreid.engine import IPESTrainer

from conftest import load_tool
from ipes_support import make_ipes_cfg, write_source_checkpoint
from test_resume import StopInEpoch, assert_identical

pytestmark = pytest.mark.usefixtures("one_thread")

PARTS = ("gen", "dis", "id")


def build(cfg, resume=False, stop=None):
    from fastreid.utils.env import seed_all_rng

    seed_all_rng(0)  # as tools/train_net.py's setup() with ROBUSTREID.SEED 0
    trainer = IPESTrainer(cfg)
    if stop is not None:
        trainer.register_hooks([stop])
    trainer.resume_or_load(resume=resume)
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory, datasets_root):
    """A straight run (2 epochs x 2 iterations), and one stopped by Ctrl-C in epoch 1, resumed."""
    tmp = tmp_path_factory.mktemp("ipes_runs")
    opts = ("MODEL.WEIGHTS", write_source_checkpoint(tmp / "source.pth", make_ipes_cfg(tmp)))
    straight = build(make_ipes_cfg(tmp / "straight", *opts))
    start = {k: v.clone() for k, v in straight.model.state_dict().items()}
    straight.train()
    stopped = build(make_ipes_cfg(tmp / "stopped", *opts), stop=StopInEpoch(1))
    with pytest.raises(KeyboardInterrupt):
        stopped.train()
    stopped_files = sorted(p.name for p in (tmp / "stopped").glob("*.pth"))
    resumed = build(make_ipes_cfg(tmp / "stopped", *opts), resume=True)
    resumed_start = resumed.start_epoch
    resumed.train()
    return dict(tmp=tmp, start=start, stopped_files=stopped_files, resumed_start=resumed_start)


def test_resumed_run_ends_with_the_uninterrupted_runs_checkpoint(runs):
    tmp = runs["tmp"]
    assert runs["stopped_files"] == ["model_0000.pth"] and runs["resumed_start"] == 1
    final = [torch.load(tmp / d / "model_final.pth", weights_only=True)
             for d in ("straight", "stopped")]
    assert {f"{p}_{kind}" for p in PARTS for kind in ("optimizer", "scheduler")} | \
        {"training_state"} <= set(final[0])
    assert final[0]["id_scheduler"]["last_epoch"] == 4  # iteration-stepped
    assert set(final[0]["training_state"]["ranks"][0]["stream"]) == {"source", "target"}
    assert_identical(final[0], final[1])


def test_every_part_trains_and_the_teacher_stays_the_source_model(runs):
    start = runs["start"]
    model = torch.load(runs["tmp"] / "straight" / "model_final.pth", weights_only=True)["model"]
    source = torch.load(runs["tmp"] / "source.pth", weights_only=True)["model"]
    for prefix in ("generator.pose_s.", "generator.style_t.", "generator.decoder_s.",
                   "discriminator.", "backbone.", "heads.weight"):
        keys = [k for k in start if k.startswith(prefix) and start[k].is_floating_point()]
        assert any(not torch.equal(start[k], model[k]) for k in keys), prefix
    for key, value in source.items():  # E_std: the source checkpoint, untouched by training
        assert torch.equal(model[f"teacher.{key}"], value), key
    assert not torch.equal(model["backbone.conv1.weight"], source["backbone.conv1.weight"])


def test_translation_grids_and_loss_terms_are_written(runs):
    out = runs["tmp"] / "straight"
    grids = sorted(p.name for p in (out / "ipes_images").iterdir())
    assert grids == ["iter_0000003.png", "iter_0000004.png"]  # VIS.PERIOD 3 and the last
    with Image.open(out / "ipes_images" / grids[0]) as grid:
        assert grid.size == (64 + 3 * 32, 7 * 64)  # label column + 3 pairs; 7 rows of 64 px
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    by_iter = {r["iteration"]: r for r in records if "loss_cyc" in r}
    # the ramp of the tiny config: w2 = w4 = 0 up to iteration 1, 3.0 from iteration 3
    assert by_iter[1]["weight_con"] == by_iter[1]["weight_kl"] == 0.0
    assert by_iter[3]["weight_con"] == by_iter[3]["weight_kl"] == 3.0
    assert {"loss_con", "loss_cam", "loss_adv", "loss_ce", "loss_soft_ce", "loss_kl", "loss_dis",
            "lr_gen", "lr_dis", "lr_id"} <= set(by_iter[3])
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))


def test_bad_ipes_input_is_one_error_line(tmp_path, datasets_root, capsys):
    train_net = load_tool("train_net")
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "SynthReID",
                          "ipes_D0_to_D2.yml")
    from ipes_support import TINY

    cases = [(("IPES.TARGET", ""), "IPES.TARGET: name the unlabelled target dataset"),
             (("IPES.KEYPOINTS.SOURCE", "files"), "have no keypoint file, e.g. "),
             (("IPES.KEYPOINTS.MIN_VISIBILITY", "0"), "IPES.KEYPOINTS.MIN_VISIBILITY must be"),
             (("IPES.LOSS.KL", "3.0"), "IPES.LOSS.KL needs the source-trained teacher")]
    for opts, message in cases:
        argv = ["--config-file", config, *TINY, "OUTPUT_DIR", str(tmp_path / "out"),
                "IPES.LOSS.KL", "0.0", *opts]
        assert train_net.cli(argv) == 2
        # the last line; the teacher's is found when training starts, after fastreid's set-up,
        # whose imports may warn on stderr (torch's cpp_extension without CUDA)
        err = capsys.readouterr().err.strip().splitlines()
        errors = [line for line in err if line.startswith("error: ")]
        assert errors == err[-1:] and message in errors[0], err


def test_the_plain_trainer_refuses_an_ipes_config(tmp_path):
    from robustreid.config import ConfigError
    from robustreid.engine import RobustTrainer, build_trainer

    with pytest.raises(ConfigError, match="IPESTrainer"):
        RobustTrainer(make_ipes_cfg(tmp_path))
    with pytest.raises(ConfigError, match="teacher"):  # build_trainer chose IPES's, which checks
        build_trainer(make_ipes_cfg(tmp_path))
