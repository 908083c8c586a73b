"""The per-family params files in profiles/: each validates, and each runs `tdm distill` as written (bf16 and
all) once its hub ids are pointed at the tiny model of its family.

Validation policy: the hub ids in the profiles are not in this machine's HF cache, so the one error allowed
when loading a profile as is, is "model.pretrained: ... not in the HF cache". The profile is then validated
completely with that check relaxed (the hub id is taken to be a model of the profile's family).
"""
from pathlib import Path

import pytest
import yaml

import tiny_models
from tdm import config

ROOT = Path(__file__).resolve().parents[2]
ALL_PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
# The profiles of the first five families (named after them); the new families' profiles (sd35_medium,
# pixart_sigma, wan, flux) validate and distil in tests/unit/test_new_families.py.
PROFILES = [p for p in ALL_PROFILES if p.stem in tiny_models.FAMILIES]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """The profiles train in bf16; accelerate keeps one process-wide precision, so reset it around each test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_every_family_has_a_profile():
    import typing

    import yaml

    families = set(typing.get_args(config.ModelConfig.model_fields["family"].annotation)) - {"digits"}
    assert {yaml.safe_load(p.read_text())["model"]["family"] for p in ALL_PROFILES} == families
    assert {p.stem for p in PROFILES} == set(tiny_models.FAMILIES)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_validates(profile, monkeypatch):
    monkeypatch.chdir(ROOT)  # prompt files are relative to the repository root
    try:
        config.load(profile)
    except config.ConfigError as err:  # the hub id is not cached here: the only acceptable error
        lines = str(err).splitlines()
        assert all(line.startswith(f"{profile}: model.pretrained:") and "not in the HF cache" in line
                   for line in lines), str(err)
    import tdm.backbones

    monkeypatch.setattr(tdm.backbones, "check_model", lambda name: (ROOT, profile.stem))
    cfg = config.load(profile)
    assert cfg.model.family == profile.stem
    assert cfg.distill.prompts != "digits" and (ROOT / cfg.distill.prompts).is_file()
    assert cfg.distill.mixed_precision == "bf16" and cfg.distill.k == 4
    assert cfg.distill.teacher == cfg.model.pretrained


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_profile_runs_distill_on_the_tiny_model_of_its_family(profile, tmp_path, monkeypatch):
    from tdm import cli

    model = tiny_models.save_pipeline(tiny_models.build(profile.stem), tmp_path / "model")
    monkeypatch.chdir(tmp_path)  # outputs/ goes here
    # A multi-stage profile (SDXL: 512 then 1024 px) keeps its shape: one iteration per stage, the first at half
    # the tiny model's 16 px.
    staged = bool(yaml.safe_load(profile.read_text())["distill"].get("stages"))
    length = ["-S", "distill.iterations=2", "-S",
              "distill.stages=[{iterations: 1, resolution: 8}, {iterations: 1, reinit_fake: true}]"] if staged \
        else ["-S", "distill.iterations=1"]
    rc = cli.main(["distill", "--params", str(profile), "-q", "-S", f"model.pretrained={model}",
                   "-S", f"distill.teacher={model}", "-S", f"distill.prompts={ROOT / 'profiles/prompts/example.txt'}",
                   *length, "-S", "distill.batch_size=2", "-S", "distill.lora_rank=4"])
    assert rc == 0
    assert (tmp_path / "outputs/distill/student/model_index.json").is_file()
    assert (tmp_path / "metrics/distill.json").is_file()
