"""QuantConfig: YAML round trip and validation."""

import dataclasses

import pytest
import yaml

from robuq.quant import QuantConfig
from robuq.quant.config import BLOCK_LINEARS, EMBEDDER_LINEARS, FINAL_LINEARS


def test_defaults_are_w158a2_hadamard_dynamic():
    c = QuantConfig()
    assert (c.act_bits, c.weight, c.rotation, c.act_mode) == (2, "ternary", "kronecker", "dynamic")
    assert c.include == BLOCK_LINEARS and not c.quantize_embedders and not c.quantize_final
    # the default include list is not shared between instances
    c.include.append("x")
    assert QuantConfig().include == BLOCK_LINEARS


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(),
        QuantConfig(
            act_bits=4, act_mode="static", act_stat="absmax", act_signed=False, timestep_groups=4,
            rotation="block", block_size=64, random_signs=False, seed=7, weight="none",
            weight_granularity="tensor", include=["transformer_blocks.*.ff.*"], exclude=["*.ff.net.2"],
            quantize_embedders=True, quantize_final=True,
        ),
        QuantConfig(act_bits=16, rotation="none"),
    ],
)
def test_yaml_round_trip(tmp_path, config):
    path = tmp_path / "quant.yaml"
    config.save(path)
    loaded = QuantConfig.load(path)
    assert loaded == config
    assert yaml.safe_load(path.read_text()) == dataclasses.asdict(config)
    assert QuantConfig.from_dict(config.to_dict()) == config


def test_partial_yaml_fills_defaults(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("act_bits: 3\nrotation: block\n")
    assert QuantConfig.load(path) == QuantConfig(act_bits=3, rotation="block")
    path.write_text("")
    assert QuantConfig.load(path) == QuantConfig()


def test_unknown_keys_refused_with_their_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown QuantConfig keys \['act_bit', 'rotate'\]"):
        QuantConfig.from_dict({"act_bit": 2, "rotate": "none", "seed": 1})
    path = tmp_path / "q.yaml"
    path.write_text("weights: ternary\n")
    with pytest.raises(ValueError, match="'weights'"):
        QuantConfig.load(path)


def test_non_mapping_yaml_refused(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("- act_bits\n- 2\n")
    with pytest.raises(ValueError, match="q.yaml.*mapping"):
        QuantConfig.load(path)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"act_mode": "per_token"}, "act_mode"),
        ({"act_stat": "max"}, "act_stat"),
        ({"rotation": "hadamard"}, "rotation"),
        ({"weight": "binary"}, "weight"),
        ({"weight_granularity": "group"}, "weight_granularity"),
        ({"act_bits": 0}, "act_bits"),
        ({"act_bits": 9}, "act_bits"),
        ({"act_bits": "2"}, "act_bits"),
        ({"act_bits": 2.0}, "act_bits"),
        ({"timestep_groups": 0}, "timestep_groups"),
        ({"timestep_groups": 1.5}, "timestep_groups"),
        ({"act_bits": True}, "act_bits"),
        ({"timestep_groups": True}, "timestep_groups"),
        ({"act_mode": 5}, "act_mode"),
        ({"act_signed": "no"}, "act_signed must be true or false, got 'no' \\(str\\)"),
        ({"quantize_final": 1}, "quantize_final must be true or false, got 1 \\(int\\)"),
        ({"seed": "7"}, "seed must be an integer, got '7' \\(str\\)"),
        ({"seed": False}, "seed must be an integer, got False \\(bool\\)"),
        ({"block_size": 64.0}, "block_size must be an integer or null, got 64.0"),
        ({"include": "transformer_blocks.*"}, "include must be a list of strings"),
        ({"exclude": ["*.ff.*", 3]}, "exclude must be a list of strings"),
    ],
)
def test_invalid_values_refused(kwargs, match):
    with pytest.raises(ValueError, match=f"QuantConfig.{match}"):
        QuantConfig(**kwargs)
    with pytest.raises(ValueError, match=f"QuantConfig.{match}"):
        QuantConfig.from_dict(kwargs)


def test_invalid_value_in_yaml_refused(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("rotation: hadamard\n")
    with pytest.raises(ValueError, match="'hadamard'"):
        QuantConfig.load(path)


def test_patterns_follow_switches():
    assert QuantConfig().patterns() == BLOCK_LINEARS
    assert QuantConfig(quantize_embedders=True).patterns() == BLOCK_LINEARS + EMBEDDER_LINEARS
    assert QuantConfig(quantize_final=True).patterns() == BLOCK_LINEARS + FINAL_LINEARS
