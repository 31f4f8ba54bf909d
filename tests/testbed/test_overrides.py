"""Config overrides, hashing, atomic JSON and the testbed's arms."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from smar.testbed.arms import ARM_NAMES, make_arm
from smar.testbed.io import read_json, write_json
from smar.testbed.overrides import apply_overrides, config_hash


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    flag: bool = False


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    arms: tuple[str, ...] = ("none", "smar")
    inner: Inner = field(default_factory=Inner)


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(
        Outer(), ["inner.lr=3e-4", "inner.steps=7", "inner.flag=true", "arms=lb,hard", "name=y"]
    )
    assert cfg == Outer(name="y", arms=("lb", "hard"), inner=Inner(lr=3e-4, steps=7, flag=True))


def test_arm_named_none_is_a_string_not_python_none():
    assert apply_overrides(Outer(), ["arms=none,smar"]).arms == ("none", "smar")
    assert apply_overrides(Optional_(), ["part=none"]).part is None
    assert apply_overrides(Optional_(), ["part=1,2"]).part == [1, 2]


@dataclass(frozen=True)
class Optional_:
    part: list[int] | None = None


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("inner.nope=1", "unknown field 'nope'"),
        ("inner.steps=abc", "cannot parse"),
        ("inner", "section.field=value"),
        ("name.x=1", "not a section"),
    ],
)
def test_bad_overrides_name_the_problem(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(Outer(), [override])


def test_hash_is_stable_and_sensitive():
    assert config_hash(Outer()) == config_hash(Outer())
    assert config_hash(Outer()) != config_hash(apply_overrides(Outer(), ["inner.lr=1"]))


def test_write_json_is_atomic_and_round_trips(tmp_path):
    path = write_json(tmp_path / "a" / "r.json", {"x": [1, 2.5]})
    assert read_json(path) == {"x": [1, 2.5]}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_arms():
    for name in ARM_NAMES:
        assert make_arm(name).name == name
    smar, smar_s = make_arm("smar"), make_arm("smar_sample")
    assert smar.modality_bias and smar.smar_weight > 0 and smar.lb_weight > 0
    assert smar_s.modality == "sample" and smar.modality == "token"
    assert make_arm("align").band == (0.0, 0.0)
    assert make_arm("bias_lb").smar_weight == 0 and make_arm("bias_lb").modality_bias
    assert make_arm("none").lb_weight == 0
    assert make_arm("hard_sample").hard_routing
    with pytest.raises(ValueError, match="unknown arm"):
        make_arm("bogus")
