"""AMD (Bai et al. 2020, offline adversarial training): tools/make_adversarial_set.py writes one
adversarial copy per training image within budget, as a balanced set the ``Balanced`` dataset trains
on, resumably; tools/reproduce_dddefense.py plans origin -> adversarial set -> AMD training."""
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_tiny_cfg

TOOL = os.path.join(REPO, "tools", "make_adversarial_set.py")
REPRODUCE = os.path.join(REPO, "tools", "reproduce_dddefense.py")
AMD_CONFIG = os.path.join(REPO, "configs", "DDDefense", "methods", "amd.yml")
SIZE = (48, 24)  # smaller than SynthReIDTiny's 64x32: the copies are attacked and saved resized
EPS = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def load_tool():
    spec = importlib.util.spec_from_file_location("make_adversarial_set_tool", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def run_tool(*args):
    """(exit code, stdout lines, stderr) of the tool run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = load_tool().main(["--no-progress", *args])
    return code, out.getvalue().strip().splitlines(), err.getvalue()


def file_state(directory):
    """{name: (md5, mtime_ns)} of every file under ``directory``."""
    state = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                state[os.path.relpath(path, directory)] = (hashlib.md5(f.read()).hexdigest(),
                                                           os.stat(path).st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def source_model(tmp_path_factory, datasets_root):
    """An (untrained) ResNet-18 checkpoint and its config.yaml, as a training run leaves them."""
    from fastreid.utils.checkpoint import Checkpointer
    from fastreid.utils.env import seed_all_rng

    from robustreid.data import SynthReIDTiny
    from robustreid.engine import RobustTrainer

    out = tmp_path_factory.mktemp("origin")
    items = SynthReIDTiny(root=datasets_root, verbose=False).train
    cfg = make_tiny_cfg(out, "INPUT.SIZE_TRAIN", str(list(SIZE)), "INPUT.SIZE_TEST", str(list(SIZE)),
                        "MODEL.HEADS.NUM_CLASSES", str(len({pid for _, pid, _ in items})))
    seed_all_rng(0)
    Checkpointer(RobustTrainer.build_model(cfg), str(out)).save("model_final")
    config = out / "config.yaml"
    config.write_text(cfg.dump())
    return {"config": str(config), "weights": str(out / "model_final.pth"), "items": items}


@pytest.fixture(scope="module")
def amd_set(source_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("amd") / "amd_set")
    code, log, err = run_tool("--config-file", source_model["config"], "--weights", source_model["weights"],
                              "--output", out, "--batch-size", "16", "--eps", str(EPS))
    assert code == 0, err
    return {"out": out, "log": log, **source_model}


def clean_resized(path):
    """The clean image as the attack saw it: bicubic resize to INPUT.SIZE_TRAIN (fastreid's test
    transform), 8 bits."""
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize(SIZE[::-1], Image.BICUBIC)).astype(int)


def test_one_copy_per_training_image_within_budget(amd_set):
    from robustreid.data.balancing import read_manifest

    out, items = amd_set["out"], amd_set["items"]
    manifest = read_manifest(out)
    adversarial = manifest["synthetic"]
    assert manifest["complete"] and manifest["generator"] == "adversarial"
    assert sorted(e["index"] for e in adversarial) == list(range(len(items)))
    assert manifest["plan"]["attack"] == "IFGSM" and manifest["plan"]["steps"] == 8
    assert manifest["plan"]["eps"] == EPS and manifest["plan"]["step_size"] == 1.0
    sha = hashlib.sha256(open(amd_set["weights"], "rb").read()).hexdigest()
    assert manifest["checkpoint"]["sha256"] == sha
    changed = []
    for e in adversarial:
        path, pid, camid = items[e["index"]]
        assert e["of"] == "bounding_box_train/" + os.path.basename(path)
        assert (e["pid"], e["camid"], e["checkpoint_sha256"]) == (pid, camid, sha)
        assert e["file"].endswith("_00.png")
        with open(os.path.join(out, e["file"]), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"  # lossless
        with Image.open(os.path.join(out, e["file"])) as img:
            adv = np.asarray(img).astype(int)
        clean = clean_resized(path)
        assert adv.shape == clean.shape == (SIZE[0], SIZE[1], 3)
        linf = np.abs(adv - clean).max()
        assert linf <= EPS and linf == e["linf"]
        changed.append(np.mean(adv != clean))
    # every image has same-ID guides in its identity batch, so every copy moved (most pixels)
    assert min(changed) > 0.3, min(changed)
    assert max(e["linf"] for e in adversarial) == EPS
    last = amd_set["log"][-1]
    assert f"{len(items)} real + {len(items)} adversarial" in last and "s/image" in last


def test_saved_copies_are_adversarial_for_the_source_model(amd_set):
    """Read back from disk, every copy is farther from its identity's other clean images in the
    model's (normalised) feature space than the clean image is: the AMA objective went up."""
    import torch.nn.functional as F

    from robustreid.attacks import ReidFeatureExtractor
    from robustreid.config import load_config
    from robustreid.engine import RobustTrainer

    items = amd_set["items"]
    manifest = json.load(open(os.path.join(amd_set["out"], "manifest.json")))
    adv_files = {e["index"]: os.path.join(amd_set["out"], e["file"]) for e in manifest["synthetic"]}
    cfg = load_config(amd_set["config"], ["MODEL.WEIGHTS", amd_set["weights"]])
    extractor = ReidFeatureExtractor(RobustTrainer.load_for_eval(cfg))

    def features(arrays):
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
        with torch.no_grad():
            return F.normalize(extractor(x))

    clean = features([clean_resized(p).astype(np.uint8) for p, _, _ in items])
    adv = features([np.asarray(Image.open(adv_files[i])) for i in range(len(items))])
    pids = [pid for _, pid, _ in items]
    for i in range(len(items)):
        same = [j for j in range(len(items)) if pids[j] == pids[i] and j != i]
        to_clean = (clean[same] - clean[i]).pow(2).sum(1).mean()
        to_adv = (clean[same] - adv[i]).pow(2).sum(1).mean()
        assert to_adv > to_clean, (i, float(to_clean), float(to_adv))


def test_balanced_dataset_trains_on_clean_and_adversarial(amd_set):
    from robustreid.config import load_config
    from robustreid.data.balancing import BALANCED_NAME, Balanced, is_synthetic

    out, items = amd_set["out"], amd_set["items"]
    data = Balanced(path=out)
    assert len(data.train) == 2 * len(items)
    assert sorted(data.real_items, key=lambda i: os.path.basename(i[0])) == sorted(
        [(os.path.join(out, "bounding_box_train", os.path.basename(p)), pid, cam) for p, pid, cam in items],
        key=lambda i: os.path.basename(i[0]))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    for e in manifest["synthetic"]:  # each copy carries its source image's labels
        _, pid, camid = items[e["index"]]
        path = os.path.join(out, e["file"])
        assert (path, pid, camid) in data.synthetic_items and is_synthetic(path)
    assert not any(is_synthetic(p) for p, _, _ in data.real_items)
    labels = sorted((pid, cam) for _, pid, cam in items)
    assert sorted((pid, cam) for _, pid, cam in data.synthetic_items) == labels
    # the AMD method config trains on it: same identities as the source, twice the images
    cfg = load_config(AMD_CONFIG, ["DATASETS.NAMES", "('SynthReIDTiny',)", "DATASETS.BALANCED.PATH", out])
    assert cfg.DATASETS.NAMES == (BALANCED_NAME,) and not cfg.ADV_TRAIN.ENABLED


def test_rerun_is_a_no_op_and_resumes_a_lost_image(amd_set):
    out, config, weights = amd_set["out"], amd_set["config"], amd_set["weights"]
    args = ["--config-file", config, "--weights", weights, "--output", out, "--batch-size", "16",
            "--eps", str(EPS)]
    before = file_state(out)
    code, log, err = run_tool(*args)
    assert code == 0, err
    assert "crafted 0 this run" in log[-1]
    assert file_state(out) == before  # not one byte or timestamp changed, the manifest included

    # an image lost after it was listed (or a kill before the manifest listed it): only it is
    # recrafted, identical to the first time (identity batches and seeds do not depend on the run)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    lost = manifest["synthetic"][7]["file"]
    os.remove(os.path.join(out, lost))
    code, log, err = run_tool(*args)
    assert code == 0, err
    assert "crafted 1 this run" in log[-1]
    after = file_state(out)
    assert after[lost][0] == before[lost][0]
    assert {k: v for k, v in after.items() if k not in (lost, "manifest.json")} == \
        {k: v for k, v in before.items() if k not in (lost, "manifest.json")}

    # other settings in the same directory are refused with one line naming what differs
    code, _, err = run_tool(*args[:-1], "4")
    assert code == 2 and err.startswith("error: ") and "eps differ" in err and len(err.splitlines()) == 1
    code, _, err = run_tool(*args, "--attack", "WMA")
    assert code == 2 and "--attack WMA" in err


def test_reproduce_plans_origin_then_adversarial_set_then_amd(tmp_path, datasets_root):
    env = dict(os.environ, FASTREID_DATASETS=datasets_root)
    result = subprocess.run([sys.executable, REPRODUCE, "--tables", "main-2", "--datasets", "Market1501",
                             "--backbones", "R50", "--methods", "amd", "--output", str(tmp_path),
                             "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    base = tmp_path / "Market1501" / "R50"
    origin = lines.index(f"train configs/DDDefense/methods/origin.yml -> {base / 'origin'}")
    (make,) = [i for i, line in enumerate(lines) if line.startswith("adversarial set ")]
    amd = lines.index(f"train configs/DDDefense/methods/amd.yml -> {base / 'amd'}")
    assert origin < make < amd
    assert lines[make] == f"adversarial set {base / 'origin' / 'model_final.pth'} -> {base / 'amd_set'}"
    assert not any(line.startswith("balance ") for line in lines)  # not the diffusion-balanced set
    assert "no config" not in result.stdout
    assert any(line.startswith(f"evaluate {base / 'amd'} ") for line in lines)
