"""`isc main` from a folder other than the checkout: the profiles name their stages `isc/configs/<x>.yaml`,
which once resolved against the current folder only ("no such file, and not a packaged config"), so the
main job refused to start anywhere but in the checkout."""

from __future__ import annotations

from isc.recipe import PROFILES, check_processes
from isc.train.config import CONFIG_DIR, config_path, load_config


def test_profile_configs_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for profile in PROFILES.values():
        for stage in profile.stages:
            assert config_path(stage.config).resolve().parent == CONFIG_DIR.resolve()
    assert load_config("isc/configs/smoke.yaml").input_size == 32
    check_processes("smoke", 2)  # raised ConfigError("nproc_per_node", "... no such file ...") before


def test_a_file_of_that_path_in_the_current_folder_still_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "isc" / "configs" / "smoke.yaml"
    own.parent.mkdir(parents=True)
    own.write_text((CONFIG_DIR / "smoke.yaml").read_text().replace("input_size: 32", "input_size: 48"))
    assert load_config("isc/configs/smoke.yaml").input_size == 48
