"""robustreid.config.read_config_file: fastreid's _BASE_ inheritance, plus a list of bases merged
left to right (configs/EAT combine recipe, dataset, backbone and method files that way)."""
import glob
import os

import pytest

from conftest import REPO


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_a_list_of_bases_merges_left_to_right_and_the_file_wins(tmp_path):
    from robustreid.config import load_config

    write(tmp_path / "recipe.yml", "SOLVER:\n  BASE_LR: 0.1\n  MAX_EPOCH: 7\nINPUT:\n  SIZE_TEST: [32, 32]\n")
    write(tmp_path / "parts" / "data.yml", "DATASETS:\n  NAMES: ('CUB200',)\nSOLVER:\n  MAX_EPOCH: 9\n")
    write(tmp_path / "parts" / "method.yml", "_BASE_: more.yml\nEAT:\n  MEMBERS: 4\n")
    write(tmp_path / "parts" / "more.yml", "EAT:\n  ENABLED: True\n  MEMBERS: 2\n")
    row = write(tmp_path / "rows" / "row.yml",
                "_BASE_: [../recipe.yml, ../parts/data.yml, ../parts/method.yml]\n"
                "SOLVER:\n  BASE_LR: 0.5\n")
    cfg = load_config(row)
    assert cfg.SOLVER.BASE_LR == 0.5            # the file's own key
    assert cfg.SOLVER.MAX_EPOCH == 9            # a later base over an earlier one
    assert list(cfg.INPUT.SIZE_TEST) == [32, 32]  # sections merge key by key
    assert tuple(cfg.DATASETS.NAMES) == ("CUB200",)
    assert cfg.EAT.ENABLED and cfg.EAT.MEMBERS == 4  # a base's own base, overridden by the base


@pytest.mark.parametrize("text, message", [
    ("_BASE_: 3\n", r"_BASE_ of .*bad.yml must be a file or a list of files, got 3"),
    ("_BASE_: [missing.yml]\n", r"_BASE_ file not found: .*missing.yml"),
    ("_BASE_: bad.yml\n", r"_BASE_ cycle: .*bad.yml -> .*bad.yml"),
    ("_BASE_: values.yml\nSOLVER:\n  BASE_LR: 0.2\n",
     r".*bad.yml: SOLVER is a section, but a value in its _BASE_"),
])
def test_bad_bases_are_one_config_error_naming_the_file(tmp_path, text, message):
    from robustreid.config import ConfigError, load_config

    write(tmp_path / "values.yml", "SOLVER: 3\n")
    bad = write(tmp_path / "bad.yml", text)
    with pytest.raises(ConfigError, match=f"^{tmp_path}/bad.yml: {message}"):
        load_config(bad)


def test_every_repository_config_reads_as_fastreids_merge_did():
    from fastreid.config import get_cfg

    from robustreid.config import add_robustreid_config, read_config_file

    configs = [c for c in glob.glob(os.path.join(REPO, "configs", "**", "*.yml"), recursive=True)
               if not {"evidence", "boards"} & set(c.split(os.sep)) and os.sep + "EAT" + os.sep not in c]
    assert len(configs) > 30
    for config in configs:
        fastreid = add_robustreid_config(get_cfg())
        fastreid.merge_from_file(config)
        ours = add_robustreid_config(get_cfg())
        ours.merge_from_other_cfg(type(ours)(read_config_file(config)))
        assert ours.dump() == fastreid.dump(), config
