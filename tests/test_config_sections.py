"""The sectioned run config (critic_align/config_sections.py): every field has one home, the user-facing ones are few,
the shipped YAMLs are written in sections and load to exactly the flat config, and the old flat ``ppo:`` block and
misplaced fields are refused naming their place."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from critic_align.config import PPOConfig
from critic_align.config_sections import ADVANCED, ORDER, SECTIONS, USER_FACING, flat_fields, section_of, sectioned
from critic_align.train.registry import CONFIG_DIR, load_run_config

FIELDS = [f.name for f in dataclasses.fields(PPOConfig)]


def test_every_field_has_one_section_and_at_most_30_are_user_facing():
    assert len(USER_FACING) == len(set(USER_FACING)), "a field listed in two sections"
    assert set(USER_FACING) <= set(FIELDS), f"not PPOConfig fields: {sorted(set(USER_FACING) - set(FIELDS))}"
    assert len(USER_FACING) <= 30, f"{len(USER_FACING)} user-facing fields (outside advanced): at most 30"
    advanced = [f for f in FIELDS if section_of(f) == ADVANCED]
    assert len(advanced) + len(USER_FACING) == len(FIELDS)
    assert sectioned({f: 0 for f in FIELDS}).keys() == set(ORDER)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_are_sectioned_and_round_trip(path):
    data = yaml.safe_load(path.read_text())
    assert "ppo" not in data
    for section in set(data) & set(ORDER):
        assert all(section_of(name) == section for name in data[section]), section
    cfg = load_run_config(str(path))["ppo"]
    flat = flat_fields({s: data[s] for s in ORDER if s in data})
    assert PPOConfig.from_dict(flat).to_dict() == cfg.to_dict()
    # sectioned() writes back what was read
    assert flat_fields(sectioned(flat)) == flat


def test_old_flat_block_and_misplaced_fields_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: [digit_prob]\nppo:\n  num_epochs: 3\n  eta: 0.5\n  micro_batch_size: 8\n")
    with pytest.raises(ValueError) as e:
        load_run_config(str(bad))
    msg = str(e.value)
    assert "flat ppo: block is the old layout" in msg
    assert "run: num_epochs" in msg and "sampling: eta" in msg and "advanced: micro_batch_size" in msg

    bad.write_text("rewards: [digit_prob]\nrun:\n  eta: 0.5\n")
    with pytest.raises(ValueError, match="eta is written under sampling:, not run: "):
        load_run_config(str(bad))
    bad.write_text("rewards: [digit_prob]\nsettings:\n  eta: 0.5\n")
    with pytest.raises(ValueError, match=r"unknown top-level keys \['settings'\]"):
        load_run_config(str(bad))
    with pytest.raises(ValueError, match="unknown section 'settings'"):
        flat_fields({"settings": {"eta": 0.5}})
    bad.write_text("rewards: [digit_prob]\nsampling:\n  etaa: 0.5\n")
    with pytest.raises(ValueError, match="sampling.etaa: unknown field .did you mean 'eta', under sampling:"):
        load_run_config(str(bad))


def test_overrides_name_fields_alone(tmp_path):
    cfg = load_run_config("digits", {"eta": 0.5, "micro_batch_size": 4, "output_dir": str(tmp_path)})["ppo"]
    assert (cfg.eta, cfg.micro_batch_size, cfg.output_dir) == (0.5, 4, str(tmp_path))
    assert SECTIONS["sampling"][0] == "num_inference_steps"


def test_a_field_only_another_algorithm_reads_is_refused():
    from critic_align.algorithms.nft import NFT
    from critic_align.algorithms.ppo import PPO
    from critic_align.config import not_applicable

    assert "clip_range" in PPO.arguments and "nft_beta" in NFT.arguments
    with pytest.raises(ValueError, match=r"clip_range=0.2 applies to algorithm: ppo / awm, not algorithm: nft"):
        PPOConfig(algorithm="nft", advantage="grpo", clip_range=0.2)
    with pytest.raises(ValueError, match=r"nft_beta=2.0 applies to algorithm: nft, not algorithm: ppo"):
        PPOConfig(nft_beta=2.0)
    with pytest.raises(ValueError, match=r"stat_min_count=1 applies to advantage: ddpo, not advantage: gae"):
        PPOConfig(stat_min_count=1)
    PPOConfig(algorithm="nft", advantage="grpo", clip_range=PPOConfig.clip_range)  # the default is not a setting
    shared = dict(algorithm="nft", advantage="grpo", clip_range=0.2, nft_beta=2.0, stat_min_count=1, learning_rate=1e-3)
    assert not_applicable(shared) == {"clip_range", "stat_min_count"}
    PPOConfig(**{k: v for k, v in shared.items() if k not in not_applicable(shared)})
