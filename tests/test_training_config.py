"""Experiment configs: defaults, a YAML file, then ``key=value``, checked by pydantic as they load.

A wrong value must fail here, naming the key and what it allows, not after a teacher has loaded.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from training.cli import STAGES
from training.config import config_to_dict, load_config
from training.table import TableConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "training" / "configs").glob("*.yaml"))
# The config class of each stage's module (the YAMLs of ``table`` load with TableConfig.load).
CONFIG_CLASSES = {
    "training.base": "BaseConfig",
    "training.attributes": "AttributesConfig",
    "training.aesthetic": "AestheticConfig",
    "training.segmentation": "SegmentationConfig",
    "training.distill": "DistillConfig",
    "training.encode": "EncodeConfig",
    "training.enhance": "EnhanceConfig",
}


@dataclass(frozen=True)
class Example:
    steps: int = 10
    lr: float = 1e-3
    adversarial: bool = False
    distance: Literal["l2", "huber"] = "l2"
    one_step_timestep: Literal[999, 800] = 999
    init_from: str | None = None
    guidance_range: tuple[float, ...] = (3.0, 7.0)
    targets: list[str] | None = None
    name: str = "run"


def test_a_bad_choice_names_the_key_and_its_choices(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"distance: .*'l2' or 'huber', got 'hubr'"):
        load_config(Example, None, ["distance=hubr"])
    path = tmp_path / "run.yaml"
    path.write_text("one_step_timestep: 500\n")
    with pytest.raises(ValueError, match=r"one_step_timestep: .*999 or 800, got 500"):
        load_config(Example, path)


def test_wrong_types_fail_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"steps: .*integer.*got 'ten'"):
        load_config(Example, None, ["steps=ten"])
    with pytest.raises(ValueError, match=r"adversarial: .*boolean.*got 'maybe'"):
        load_config(Example, None, ["adversarial=maybe"])
    with pytest.raises(ValueError, match=r"guidance_range\.1: .*number.*got 'x'"):
        load_config(Example, None, ["guidance_range=1,x"])


def test_unknown_keys_list_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown config keys \['stepz'\]; allowed: .*'steps'"):
        load_config(Example, None, ["stepz=3"])
    with pytest.raises(ValueError, match="key=value"):
        load_config(Example, None, ["steps"])


def test_command_line_strings_take_their_field_types() -> None:
    config = load_config(
        Example,
        None,
        [
            "steps=3",
            "--lr=1e-4",
            "adversarial=true",
            "distance=huber",
            "one_step_timestep=800",
            "init_from=runs/a.safetensors",
            "guidance_range=[1.5, 3]",
            "targets=to_q,to_out.0",
        ],
    )
    assert config == Example(
        steps=3,
        lr=1e-4,
        adversarial=True,
        distance="huber",
        one_step_timestep=800,
        init_from="runs/a.safetensors",
        guidance_range=(1.5, 3.0),
        targets=["to_q", "to_out.0"],
    )
    assert load_config(Example, None, ["adversarial=1"]).adversarial is True
    assert load_config(Example, None, ["adversarial=false"]).adversarial is False
    assert load_config(Example, None, ["adversarial=0"]).adversarial is False
    assert load_config(Example, None, ["init_from=none"]).init_from is None
    assert load_config(Example, None, ["targets=null"]).targets is None
    assert load_config(Example, None, ["guidance_range="]).guidance_range == ()
    assert load_config(Example, None, ["name=none"]).name == "none"  # not optional: a string


def test_yaml_values_then_overrides_over_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\nlr: 1\nguidance_range: [1.5, 3.0]\ninit_from: null\n")
    config = load_config(Example, path, ["steps=7"])
    assert config == Example(steps=7, lr=1.0, guidance_range=(1.5, 3.0))
    assert isinstance(config.lr, float)
    path.write_text("init_from: none\nguidance_range: 1.5, 3\none_step_timestep: '800'\n")
    config = load_config(Example, path)
    assert config == Example(guidance_range=(1.5, 3.0), one_step_timestep=800)
    path.write_text("- steps\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(Example, path)


def test_the_saved_config_round_trips_through_json(tmp_path: Path) -> None:
    config = load_config(Example, None, ["distance=huber", "targets=[a,b]", "lr=2e-4"])
    path = tmp_path / "config.json"  # JSON is YAML: a saved config loads as a config file
    path.write_text(json.dumps(config_to_dict(config)))
    assert load_config(Example, path) == config


def config_class(path: Path) -> type:
    """The config class of the stage that ``path``'s own usage line runs it with."""
    pattern = rf"hypersd-train (\S+) --config training/configs/{re.escape(path.name)}"
    usage = re.search(pattern, path.read_text())
    assert usage, f"{path.name} does not say which stage it is for"
    module = STAGES[usage.group(1)].split(":")[0]
    return getattr(importlib.import_module(module), CONFIG_CLASSES[module])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    if "hypersd-train table" in path.read_text():
        assert TableConfig.load(path).rows
    else:
        load_config(config_class(path), path)


def test_a_fixed_choice_of_a_shipped_config_is_checked_as_it_loads() -> None:
    from training.enhance import EnhanceConfig

    with pytest.raises(ValueError, match=r"lr_schedule: .*'constant' or 'cosine', got 'cosin'"):
        load_config(EnhanceConfig, None, ["lr_schedule=cosin"])


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_the_real_model_configs_chain_into_each_other(family: str) -> None:
    """encode -> tscd -> feedback -> dmd: each stage reads the files the one before writes."""
    from training.distill import DistillConfig
    from training.encode import EncodeConfig
    from training.enhance import EnhanceConfig

    configs = ROOT / "training" / "configs"
    encode = load_config(EncodeConfig, configs / f"{family}-encode.yaml")
    tscd = load_config(DistillConfig, configs / f"{family}-tscd.yaml")
    feedback = load_config(EnhanceConfig, configs / f"{family}-feedback.yaml")
    dmd = load_config(EnhanceConfig, configs / f"{family}-dmd.yaml")
    # TSCD trains on the encoded shards; its k = 1 stage exports <out_dir>/k1/<name>-1step
    assert (tscd.data, tscd.data_path) == ("encoded", encode.out_dir)
    assert tscd.resolution == encode.resolution
    one_step = f"{tscd.out_dir}/k1/{tscd.export_name}-1step.safetensors"
    assert feedback.start_loras == (one_step,)
    feedback_lora = f"{feedback.out_dir}/{feedback.export_name}.safetensors"
    assert dmd.start_loras == (one_step, feedback_lora)
    assert tscd.teacher == feedback.teacher == dmd.teacher == encode.teacher
