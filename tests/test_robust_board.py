"""tools/robust_board.py: two tiny models under one protocol file, one leaderboard (markdown, CSV,
JSON) with clean, white-box, transfer, query-based, UAP and corruption columns; finished cells are
skipped on rerun, a changed column reruns alone, --columns/--models run a share; bad input is one
error line."""
import csv
import json
import os

import pytest
import yaml

from conftest import REPO, load_tool

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
OVERRIDES = {"DATASETS.NAMES": "('SynthReIDTiny',)", "DATASETS.TESTS": "('SynthReIDTiny',)",
             "INPUT.SIZE_TEST": "[64,32]", "DATALOADER.NUM_WORKERS": "0",
             "TEST.IMS_PER_BATCH": "32"}
COLUMNS = {
    "white_box": {"protocol": "retrieval", "attacks": "FNA", "eps": 8, "steps": 2,
                  "max-queries": 4},
    "transfer": {"protocol": "retrieval", "attacks": "FNA", "eps": 8, "steps": 2,
                 "max-queries": 4, "surrogate": "a"},
    "query": {"protocol": "query", "attacks": "HSJA", "eps": 8, "query-budget": 10,
              "max-queries": 4},
    "uap": {"protocol": "uap", "eps": 8, "steps": 2, "surrogate": "a"},
    "corruptions": {"protocol": "corruptions", "corruptions": "gaussian_noise,contrast",
                    "severity": "1,5", "max-queries": 4},
}


def write_protocol(path, models, columns=COLUMNS):
    path.write_text(yaml.safe_dump({"overrides": OVERRIDES, "columns": columns,
                                    "models": models}, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def models(trained_tiny):
    return {"a": {"config": CONFIG, "weights": trained_tiny(0)[2]},
            "b": {"config": CONFIG, "weights": trained_tiny(1)[2]}}


def test_board_table_and_resumed_reruns(models, tmp_path, capsys, monkeypatch):
    board_tool = load_tool("robust_board")
    out = tmp_path / "board"
    protocol = write_protocol(tmp_path / "board.yml", models)
    assert board_tool.main(["--protocol", protocol, "--output", str(out)]) == 0, \
        capsys.readouterr().err[-3000:]
    first = capsys.readouterr().out
    assert first.count(": started") == 8 and first.count("left out") == 2  # a's own surrogate
    board = json.loads((out / "board.json").read_text())
    rows = {r["model"]: r for r in board["rows"]}
    assert list(rows) == ["a", "b"] and board["reference"] == "a"
    assert set(rows["a"]["cells"]) == {"white_box", "query", "corruptions"}
    assert set(rows["b"]["cells"]) == set(COLUMNS)
    assert rows["b"]["cells"]["uap"]["setting"] == "UAP 8/255-2"
    assert rows["a"]["cells"]["corruptions"]["mCE"] == pytest.approx(100.0)  # the reference
    for row in rows.values():
        assert row["cells"]["white_box"]["mAP"] <= row["clean"]["mAP"]
    table = (out / "board.md").read_text()
    assert ("| Model | Dataset | Clean | white_box | transfer | query | uap | corruptions | "
            "corruptions grid mean mAP | corruptions mCE |") in table
    b = rows["b"]
    assert (f"| b | SynthReIDTiny | {b['clean']['mAP']:.1f}/{b['clean']['Rank-1']:.1f} | "
            f"{b['cells']['white_box']['mAP']:.1f}/{b['cells']['white_box']['Rank-1']:.1f} |"
            in table)
    assert "| a | SynthReIDTiny |" in table and " — |" in table
    with open(out / "board.csv") as f:
        records = list(csv.DictReader(f))
    assert [r["model"] for r in records] == ["a", "b"]
    assert float(records[1]["uap_mAP"]) == pytest.approx(b["cells"]["uap"]["mAP"])
    assert records[0]["uap_mAP"] == ""

    # Rerun: every finished cell is skipped, robust_eval is not run at all
    board_eval = load_tool("robust_board")

    def refuse(argv):
        raise AssertionError(f"robust_eval ran again: {argv}")

    monkeypatch.setattr(board_eval.evidence, "evaluate", refuse)
    assert board_eval.main(["--protocol", protocol, "--output", str(out)]) == 0
    again = capsys.readouterr().out
    assert again.count("skipped (finished earlier)") == 8 and ": started" not in again
    assert json.loads((out / "board.json").read_text())["rows"] == board["rows"]
    monkeypatch.undo()

    # One column changed: only its cells run again
    changed = {**COLUMNS, "query": {**COLUMNS["query"], "query-budget": 12}}
    protocol = write_protocol(tmp_path / "board2.yml", models, changed)
    assert load_tool("robust_board").main(["--protocol", protocol, "--output", str(out)]) == 0
    third = capsys.readouterr().out
    assert third.count(": started") == 2 and third.count("skipped (finished earlier)") == 6
    assert "a / query: started" in third and "b / query: started" in third

    # A share of the board: only b's white-box cell runs now; the board holds what is finished
    part = tmp_path / "part"
    assert load_tool("robust_board").main(["--protocol", protocol, "--output", str(part),
                                           "--columns", "white_box", "--models", "b"]) == 0
    fourth = capsys.readouterr().out
    assert fourth.count(": started") == 1 and "b / white_box: started" in fourth
    assert fourth.count("not run now") == 7
    rows = json.loads((part / "board.json").read_text())["rows"]
    assert [(r["model"], set(r["cells"])) for r in rows] == [("b", {"white_box"})]
    assert load_tool("robust_board").main(["--protocol", protocol, "--output", str(part),
                                           "--columns", "white_box,nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--columns: unknown ['nope']" in err[0], err


@pytest.mark.parametrize("columns, models, message", [
    ({"x": {"protocol": "retrieval", "output": "elsewhere"}}, None, "'output'"),
    ({"x": {"protocol": "retrieval", "no-such-option": 1}}, None, "'no-such-option'"),
    ({"x": {"protocol": "uap", "surrogate": "nobody"}}, None, "surrogate 'nobody'"),
    ({"x": {"protocol": "corruptions", "severity": "9"}}, None, "--severity"),
    ({"x": {"protocol": "retrieval"}}, {"a": {"config": CONFIG, "weights": "/no/such.pth"}},
     "/no/such.pth"),
])
def test_bad_protocol_files_exit_2_with_one_line(columns, models, message, tmp_path, capsys):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    protocol = write_protocol(tmp_path / "p.yml",
                              models or {"a": {"config": CONFIG, "weights": str(weights)}},
                              columns)
    code = load_tool("robust_board").main(["--protocol", protocol, "--output",
                                           str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_shipped_demo_board_names_the_demo_configs_and_weights():
    """configs/SynthReID/boards/demo.yml: its models are the configs and the weights tools/demo.py
    writes (relative paths resolved from the file)."""
    columns, _, models = load_tool("robust_board").load_protocol(
        os.path.join(REPO, "configs", "SynthReID", "boards", "demo.yml"))
    assert {"white_box", "transfer", "query", "uap", "corruptions"} <= set(columns)
    for name, (config, weights) in models.items():
        assert os.path.isfile(config), config
        assert weights == os.path.join(REPO, "logs", "demo", name, "model_final.pth")
