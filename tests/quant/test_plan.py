"""BitPlan files: round trip, atomic writes, errors that name the file."""

import pytest
import yaml

from robuq.quant import BitPlan
from robuq.quant.plan import as_bits, check_plan_layers

BITS = {
    "transformer_blocks.0.attn1.to_q": 2,
    "transformer_blocks.0.ff.net.2": 4,
    "transformer_blocks.1.norm1.linear": 1,
}


def test_round_trip_with_metadata(tmp_path):
    plan = BitPlan(
        bits=dict(BITS), budget=2.0, weighting="macs", candidates=[1, 2, 3, 4, 8], method="dp",
        source="runs/x/last.ckpt", extra={"note": "from the search", "distortion": 0.125},
    )
    path = tmp_path / "plans" / "a2.yaml"  # parent created on save
    plan.save(path)
    loaded = BitPlan.load(path)
    assert loaded == plan
    assert list(loaded.bits) == list(BITS)  # layer order kept
    raw = yaml.safe_load(path.read_text())
    assert raw["bits"] == BITS and raw["note"] == "from the search" and "extra" not in raw


def test_round_trip_minimal_plan_omits_unset_fields(tmp_path):
    path = tmp_path / "p.yaml"
    BitPlan(bits={"a": 3}).save(path)
    assert yaml.safe_load(path.read_text()) == {"bits": {"a": 3}}
    assert BitPlan.load(path) == BitPlan(bits={"a": 3})


def test_save_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "p.yaml"
    BitPlan(bits={"a": 2}).save(path)
    BitPlan(bits={"a": 4}).save(path)  # overwrite in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]
    assert BitPlan.load(path).bits == {"a": 4}
    # a failed write leaves the previous file intact and no temp file behind
    with pytest.raises(yaml.YAMLError):
        BitPlan(bits={"a": 8}, extra={"bad": object()}).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]
    assert BitPlan.load(path).bits == {"a": 4}


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        BitPlan.load(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "text,match",
    [
        ("bits: {a: 2\n", "not valid YAML"),
        ("- a\n- b\n", "'bits' mapping"),
        ("budget: 2.0\n", "'bits' mapping"),
        ("bits: [2, 4]\n", "'bits' mapping"),
        ("", "'bits' mapping"),
        ("bits: {a: 0}\n", "layer 'a' has activation width 0"),
        ("bits: {a: 9}\n", "layer 'a' has activation width 9"),
        ("bits: {a: '2'}\n", "layer 'a' has activation width '2'"),
        ("bits: {a: 2.5}\n", "layer 'a' has activation width 2.5"),
        ("bits: {a: true}\n", "layer 'a' has activation width True"),
        ("bits: {a: 16}\n", "layer 'a' has activation width 16"),
    ],
)
def test_invalid_files_name_the_file(tmp_path, text, match):
    path = tmp_path / "broken_plan.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        BitPlan.load(path)
    assert str(path) in str(info.value)
    assert match in str(info.value)


def test_as_bits_normalises_every_form(tmp_path):
    path = tmp_path / "p.yaml"
    BitPlan(bits=dict(BITS)).save(path)
    assert as_bits(None) == {}
    assert as_bits(dict(BITS)) == BITS
    assert as_bits(BitPlan(bits=dict(BITS))) == BITS
    assert as_bits(path) == BITS and as_bits(str(path)) == BITS
    with pytest.raises(ValueError, match="'x'"):
        as_bits({"x": 0})


def test_check_plan_layers_suggests_close_names():
    layers = list(BITS)
    check_plan_layers({"transformer_blocks.0.ff.net.2": 3}, layers)
    with pytest.raises(ValueError, match=r"1 layer\(s\).*did you mean 'transformer_blocks.0.ff.net.2'"):
        check_plan_layers({"transformer_blocks.0.ff.net.3": 3}, layers)
    with pytest.raises(ValueError, match="'blocks.0.mlp.fc1'"):
        check_plan_layers({"blocks.0.mlp.fc1": 3}, layers)
