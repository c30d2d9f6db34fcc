"""tools/uda_eval.py (issue 16, item 6): the thesis's Table 3.1 layout with its numbers beside a
run's, the direct-transfer row, and the identity-preservation line."""
import logging
import os

import pytest

from conftest import REPO, load_tool
from ipes_support import CONFIG, TINY, make_ipes_cfg, write_source_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tool():
    return load_tool("uda_eval")


def test_thesis_rows_are_found_by_source_and_target(tool):
    rows = {method: values for method, _, values in tool.paper_rows("DukeMTMC", ["Market1501"])}
    assert rows["IPES-GAN (IBN-ResNet-50)"]["Market1501"] == {
        "Rank-1": 66.8, "Rank-5": 81.2, "Rank-10": 85.4, "mAP": 34.4}
    assert rows["Direct testing"]["Market1501"] == {"Rank-1": 56.1, "mAP": 26.8}
    market_duke = {m: v for m, _, v in tool.paper_rows("Market1501", ["DukeMTMC", "MSMT17"])}
    assert market_duke["IPES-GAN (IBN-ResNet-50)"]["DukeMTMC"]["mAP"] == 33.3
    assert market_duke["IPES-GAN (IBN-ResNet-50)"]["MSMT17"]["Rank-1"] == 20.2
    assert tool.paper_rows("SynthReID_D0", ["SynthReID_D2"]) == []
    table = tool.format_table("DukeMTMC", ["Market1501"],
                              tool.paper_rows("DukeMTMC", ["Market1501"]))
    header, _, *lines = table.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Methods", "Reference", "DukeMTMC->Market1501 CMC-1", "DukeMTMC->Market1501 CMC-5",
        "DukeMTMC->Market1501 CMC-10", "DukeMTMC->Market1501 mAP"]
    direct = [line for line in lines if line.startswith("| Direct testing")][0]
    assert [c.strip() for c in direct.strip("|").split("|")][2:] == ["56.1", "-", "-", "26.8"]


def test_a_short_run_prints_direct_transfer_adabn_ipes_and_identity(tool, tmp_path, datasets_root,
                                                              capsys):
    source = write_source_checkpoint(tmp_path / "source.pth", make_ipes_cfg(tmp_path))
    try:
        assert tool.main(["--config-file", CONFIG, "--identity-pairs", "4", *TINY,
                          "SOLVER.MAX_EPOCH", "1", "MODEL.WEIGHTS", source,
                          "OUTPUT_DIR", str(tmp_path / "out")]) == 0
    finally:  # setup() bound handlers to this test's captured streams
        for name in ("fastreid", "robustreid"):
            logging.getLogger(name).handlers.clear()
    out = capsys.readouterr().out.splitlines()
    start = [i for i, line in enumerate(out) if line.startswith("| Methods")][-1]
    end = start + next(i for i, line in enumerate(out[start:]) if not line.startswith("|"))
    rows = [line.split("|")[1].strip() for line in out[start + 2:end]]
    # no thesis row for SynthReID
    assert rows == ["Direct transfer", "Direct transfer + AdaBN", "IPES-GAN (ResNet-18)"]
    assert "SynthReIDTiny_D0->SynthReIDTiny_D2 mAP" in out[start]
    identity = [line for line in out if line.startswith("Identity preservation:")]
    assert len(identity) == 1 and "of 4 views" in identity[0] and "chance" in identity[0]
    assert os.path.isfile(tmp_path / "out" / "model_final.pth")


def test_a_config_without_ipes_is_one_error_line(tool, tmp_path, capsys):
    config = os.path.join(REPO, "configs", "SynthReID", "bagtricks_R18.yml")
    assert tool.main(["--config-file", config, "OUTPUT_DIR", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "IPES.ENABLED False" in err[-1]
    assert [line for line in err if line.startswith("error:")] == err[-1:]
