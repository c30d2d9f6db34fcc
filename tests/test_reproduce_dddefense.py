"""tools/reproduce_dddefense.py end to end on SynthReIDTiny with a tiny schedule."""
import os
import subprocess
import sys

from conftest import REPO

TOOL = os.path.join(REPO, "tools", "reproduce_dddefense.py")
TINY = ["MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", "512",
        "MODEL.BACKBONE.PRETRAIN", "False", "MODEL.BACKBONE.LAST_STRIDE", "2",
        "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "16", "SOLVER.MAX_EPOCH", "1",
        "SOLVER.STEPS", "[1]", "ADV_TRAIN.STEPS", "2", "TEST.ROBUST.ENABLED", "False",
        "TEST.EVAL_PERIOD", "1", "TEST.IMS_PER_BATCH", "32"]


def reproduce(*args, datasets_root):
    env = dict(os.environ, FASTREID_DATASETS=datasets_root)
    return subprocess.run([sys.executable, TOOL, *args], env=env, capture_output=True, text=True,
                          timeout=900)


def test_dry_run_plans_shared_runs_once(tmp_path, datasets_root):
    result = reproduce("--tables", "main-2,main-5,supp-3", "--datasets", "Market1501",
                       "--backbones", "R50", "--output", str(tmp_path), "--dry-run",
                       datasets_root=datasets_root)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # BS / MS / BS+MS rows evaluate the one "origin" model behind each input defense.
    assert out.count("methods/origin.yml -> " + str(tmp_path / "Market1501" / "R50" / "origin")) == 1
    assert "--defense BitSqueezing+MedianSmoothing2D" in out
    assert "on DukeMTMC" in out  # cross-dataset rows
    assert "from " + str(tmp_path / "Market1501" / "OSNet" / "origin") in out  # black-box source
    assert "DAS has no public specification" in out


def test_bad_table_is_one_line_error(tmp_path, datasets_root):
    result = reproduce("--tables", "main-9", "--output", str(tmp_path), datasets_root=datasets_root)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --tables: unknown table(s) ['main-9']")


def test_tiny_reproduction_trains_evaluates_and_prints_the_paper_layout(tmp_path, datasets_root):
    args = ["--tables", "main-3,supp-7", "--datasets", "Market1501",
            "--methods", "metric_at,metric_at_fnes", "--dataset-map", "Market1501=SynthReIDTiny",
            "--eval-max-queries", "6", "--output", str(tmp_path), *TINY]
    first = reproduce(*args, datasets_root=datasets_root)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    out = first.stdout
    assert "### main-3" in out and "### supp-7" in out
    row = next(line for line in out.splitlines() if "| metric_at_fnes |" in line)
    cells = row.split("|")[4:-1]
    assert len(cells) == 7
    assert "(68.29/88.07)" in cells[0]  # the paper's number beside ours
    assert not any(c.strip().startswith("—") for c in cells), row  # every cell of ours filled
    cost_row = next(line for line in out.splitlines() if line.startswith("| Market1501 | R50 | metric_at |")
                    and "(328.5)" in line)
    assert not cost_row.split("|")[4].strip().startswith("—")
    # A second run finds every training and evaluation done and runs nothing.
    again = reproduce(*args, datasets_root=datasets_root)
    assert again.returncode == 0
    assert "$ " not in again.stdout
