"""Config specs: JSON round trips (nested Interval / Rescale included), errors that name the field, spec files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import guidekit as gk
from guidekit.config import params_model
from guidekit.errors import ConfigError, UnknownNameError

finite = st.floats(-20.0, 20.0, allow_nan=False)
positive = st.floats(0.0, 50.0)

leaves = st.one_of(
    st.builds(gk.CFG, scale=finite),
    st.builds(
        gk.APG,
        scale=finite,
        eta=st.floats(0.0, 1.0),
        norm_threshold=positive,
        momentum=st.floats(-0.99, 0.99),
    ),
)


def _interval(inner: gk.GuidanceStrategy, lo: float, width: float | None) -> gk.Interval:
    return gk.Interval(inner, sigma_lo=lo, sigma_hi=None if width is None else lo + width)


strategies = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(gk.Rescale, inner=inner, phi=st.floats(0.0, 1.0)),
        st.builds(_interval, inner, st.floats(0.0, 10.0), st.one_of(st.none(), st.floats(0.0, 80.0))),
    ),
    max_leaves=4,
)


@given(strategy=strategies)
def test_specs_round_trip_through_json(strategy: gk.GuidanceStrategy) -> None:
    spec = gk.to_spec(strategy)
    text = spec.model_dump_json()
    assert gk.ComponentSpec.model_validate_json(text) == spec
    assert gk.build(text) == strategy  # a JSON string
    assert gk.build(json.loads(text)) == strategy  # a dict
    assert gk.build(spec) == strategy  # a spec
    assert gk.to_spec(gk.build(spec)) == spec


@given(strategy=strategies)
def test_nested_specs_mirror_the_object_tree(strategy: gk.GuidanceStrategy) -> None:
    spec = gk.to_spec(strategy).model_dump()
    node, obj = spec, strategy
    while isinstance(obj, gk.Interval | gk.Rescale):
        assert node["name"] == obj.registry_name
        node, obj = node["params"]["inner"], obj.inner
    assert node["name"] == obj.registry_name and node["params"] == {
        k: getattr(obj, k) for k in params_model(type(obj)).model_fields
    }


def test_bare_names_build_defaults() -> None:
    assert gk.build("apg") == gk.APG()
    assert gk.build({"name": "interval"}) == gk.Interval(gk.CFG(2.0), 0.28, 5.42)
    assert gk.build({"name": "rescale", "params": {"phi": 0.5}}) == gk.Rescale(gk.CFG(7.5), 0.5)


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ({"name": "apg", "params": {"eta": "high"}}, ["spec[apg].eta", "'high'"]),
        ({"name": "apg", "params": {"etta": 0.5}}, ["spec[apg].etta", "Extra inputs are not permitted"]),
        ({"name": "cfg", "params": {"scale": "7.5"}}, ["spec[cfg].scale", "'7.5'"]),
        (
            {"name": "interval", "params": {"inner": {"name": "cfg", "params": {"scale": "x"}}}},
            ["spec[interval].inner", "scale"],
        ),
        (
            {
                "name": "rescale",
                "params": {
                    "inner": {"name": "interval", "params": {"inner": {"name": "apg", "params": {"momentum": None}}}}
                },
            },
            ["spec[rescale].inner[interval].inner[apg].momentum"],
        ),
        ({"name": "interval", "params": {"sigma_lo": 3.0, "sigma_hi": 1.0}}, ["spec[interval]", "sigma_hi", "got 1.0"]),
        ({"name": "rescale", "params": {"phi": 2.0}}, ["spec[rescale]", "phi: expected a number in [0, 1], got 2.0"]),
        ({"name": "apg", "params": {"norm_threshold": -1.0}}, ["spec[apg]", "norm_threshold", "got -1.0"]),
        ({"params": {}}, ["spec", "name", "Field required"]),
    ],
)
def test_config_errors_name_the_field_and_the_value(spec: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        gk.build(spec)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_unknown_strategy_names_suggest_the_closest() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'interval'"):
        gk.build({"name": "intervall"})
    with pytest.raises(UnknownNameError, match=r"did you mean 'cfg'"):
        gk.build({"name": "interval", "params": {"inner": {"name": "cgf"}}})


def test_malformed_json_strings_are_refused() -> None:
    with pytest.raises(ConfigError, match="expected valid JSON"):
        gk.build('{"name": "apg", "params": {')


def test_to_spec_refuses_unregistered_objects() -> None:
    with pytest.raises(ConfigError, match="expected a registered dataclass component, got str"):
        gk.to_spec("apg")


def test_unbounded_interval_round_trips_as_null() -> None:
    s = gk.Interval.from_flow_times(gk.APG(), 0.2, 1.0)
    text = gk.to_spec(s).model_dump_json()
    assert '"sigma_hi":null' in text and gk.build(text) == s


# -- spec files -----------------------------------------------------------------------------------------
def test_load_spec_reads_json_and_toml(tmp_path: Path) -> None:
    spec = gk.to_spec(gk.Interval(gk.Rescale(gk.APG(scale=9.0), 0.5), 0.3, 4.0))
    (tmp_path / "g.json").write_text(spec.model_dump_json())
    (tmp_path / "g.toml").write_text(
        'name = "interval"\n[params]\nsigma_lo = 0.3\nsigma_hi = 4.0\n'
        '[params.inner]\nname = "rescale"\n[params.inner.params]\nphi = 0.5\n'
        '[params.inner.params.inner]\nname = "apg"\n[params.inner.params.inner.params]\nscale = 9.0\n'
    )
    assert gk.load_spec(tmp_path / "g.json") == spec
    assert gk.build(gk.load_spec(tmp_path / "g.toml")) == gk.build(spec)


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("bad.json", '{"name": "apg",', r"bad\.json'?: expected valid JSON"),
        ("bad.toml", "name = ", r"bad\.toml'?: expected valid TOML"),
        ("list.json", "[1, 2]", r"list\.json'?: expected a spec"),
        ("extra.json", '{"name": "apg", "parms": {}}', r"extra\.json'?.*parms"),
    ],
)
def test_malformed_spec_files_name_the_file(tmp_path: Path, name: str, text: str, match: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=match):
        gk.load_spec(tmp_path / name)


def test_missing_spec_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*nope\.json"):
        gk.load_spec(tmp_path / "nope.json")


def test_params_models_are_strict_and_carry_defaults() -> None:
    model = params_model(gk.APG)
    assert set(model.model_fields) == {"scale", "eta", "norm_threshold", "momentum"}
    assert model().model_dump() == {"scale": 15.0, "eta": 0.0, "norm_threshold": 15.0, "momentum": -0.5}
    nested = params_model(gk.Interval)().model_dump()
    assert nested["inner"] == {"name": "cfg", "params": {"scale": 2.0}}


def test_to_spec_refuses_an_unregistered_subclass_instead_of_writing_its_base() -> None:
    @dataclass(frozen=True)
    class LoudCFG(gk.CFG):
        pass

    with pytest.raises(
        ConfigError,
        match=r"obj: expected a registered dataclass component, got LoudCFG, an unregistered subclass of CFG "
        r"\(registered as 'cfg'\) whose spec would rebuild as CFG",
    ):
        gk.to_spec(LoudCFG(3.0))
    with pytest.raises(ConfigError, match=r"got LoudCFG"):
        gk.to_spec(gk.Interval(LoudCFG(3.0)))  # nested too
    assert gk.to_spec(gk.CFG(3.0)).name == "cfg"
