"""The registry: lazy entry points (injected fakes), duplicates, aliases, unknown names, broken and hostile plugins."""

from __future__ import annotations

import sys
import textwrap
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import importlib_metadata
import pytest
from hypothesis import given
from hypothesis import strategies as st

import guidekit as gk
from guidekit.errors import ConfigError, PluginError, UnknownNameError
from guidekit.registry import ENERGY, STRATEGIES, PluginWarning, Registry, component_of_group

GROUP = "guidekit.test-things"


@pytest.fixture
def plugin_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Importable modules for fake entry points: a good plugin, one that crashes on import, one that counts."""
    (tmp_path / "gk_fake_good.py").write_text(
        textwrap.dedent(
            """
            from dataclasses import dataclass
            import guidekit as gk

            @dataclass(frozen=True)
            class Doubler(gk.GuidanceStrategy):
                def combine(self, pred_cond, pred_uncond, ctx):
                    return 2 * pred_cond - pred_uncond
            """
        )
    )
    (tmp_path / "gk_fake_broken.py").write_text("raise RuntimeError('this plugin is broken on purpose')\n")
    (tmp_path / "gk_fake_builtins.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("gk_fake_good", "gk_fake_broken", "gk_fake_builtins"):
        sys.modules.pop(name, None)
    return tmp_path


def entry_points(*specs: tuple[str, str]) -> tuple[list[importlib_metadata.EntryPoint], list[str]]:
    eps = [importlib_metadata.EntryPoint(name=n, value=v, group=GROUP) for n, v in specs]
    calls: list[str] = []
    return eps, calls


def fake_registry(*specs: tuple[str, str], builtins: tuple[str, ...] = ()) -> tuple[Registry, list[str]]:
    eps, calls = entry_points(*specs)

    def provider(group: str) -> list[importlib_metadata.EntryPoint]:
        calls.append(group)
        return [ep for ep in eps if ep.group == group]

    return Registry(GROUP, "thing", builtins=builtins, entry_points=provider), calls


def test_entry_points_are_read_lazily_and_once(plugin_modules: Path) -> None:
    reg, calls = fake_registry(("doubler", "gk_fake_good:Doubler"))
    assert calls == []  # nothing at construction
    reg.register("builtin", object())
    reg.get("builtin")
    assert calls == []  # a hit never scans plugins
    doubler = reg.get("doubler")
    assert doubler.__name__ == "Doubler" and calls == [GROUP]
    assert reg.origin("doubler") == "plugin gk_fake_good:Doubler"
    reg.names()
    reg.names()
    assert "doubler" in reg.names() and len(calls) == 2  # one full scan, then cached


def test_builtin_modules_are_imported_on_first_use(plugin_modules: Path) -> None:
    reg, _ = fake_registry(builtins=("gk_fake_builtins",))
    assert "gk_fake_builtins" not in sys.modules
    reg.names()
    assert sys.modules["gk_fake_builtins"].IMPORTED


def test_duplicates_are_refused_unless_overridden() -> None:
    reg, _ = fake_registry()
    first, second = object(), object()
    reg.register("x", first)
    reg.register("x", first)  # the same object again is harmless
    with pytest.raises(ConfigError, match=r"'x' is already registered .*override=True"):
        reg.register("x", second)
    reg.register("x", second, override=True)
    assert reg.get("x") is second
    with pytest.raises(ConfigError, match="name: expected a non-empty string"):
        reg.register("", first)


def test_plugin_clashing_with_a_builtin_never_replaces_it(plugin_modules: Path) -> None:
    reg, _ = fake_registry(("cfg", "gk_fake_good:Doubler"))
    builtin = object()
    reg.register("cfg", builtin)
    with pytest.warns(PluginWarning):
        names = reg.names()
    assert names == ["cfg"] and reg.get("cfg") is builtin and reg.origin("cfg") == "code"


def test_plugin_clashing_with_a_builtin_is_reported(plugin_modules: Path) -> None:
    reg, _ = fake_registry(("cfg", "gk_fake_good:Doubler"))
    reg.register("cfg", object())
    with pytest.warns(PluginWarning, match="'cfg'.*clashes"):
        reg.names()


def test_broken_plugins_are_named_and_the_rest_keep_working(plugin_modules: Path) -> None:
    reg, _ = fake_registry(
        ("broken", "gk_fake_broken:Thing"),
        ("missing-attr", "gk_fake_good:NoSuchClass"),
        ("doubler", "gk_fake_good:Doubler"),
    )
    with pytest.warns(PluginWarning) as record:
        names = reg.names()
    messages = " | ".join(str(w.message) for w in record)
    assert "'broken' (gk_fake_broken:Thing)" in messages and "broken on purpose" in messages
    assert "'missing-attr'" in messages and "NoSuchClass" in messages
    assert names == ["doubler"]
    with pytest.raises(PluginError, match="'broken' comes from a plugin that failed to load: RuntimeError"):
        reg.get("broken")
    assert set(reg.broken) == {"broken", "missing-attr"}


def test_a_broken_plugin_does_not_break_lookups_of_good_ones(plugin_modules: Path) -> None:
    reg, _ = fake_registry(("broken", "gk_fake_broken:Thing"), ("doubler", "gk_fake_good:Doubler"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # looking up a good plugin must not even load the broken one
        assert reg.get("doubler").__name__ == "Doubler"


def test_unknown_name_lists_known_names_and_the_closest() -> None:
    reg, _ = fake_registry()
    for name in ("cfg", "apg", "samg", "interval"):
        reg.register(name, object())
    with pytest.raises(UnknownNameError) as info:
        reg.get("apgg")
    text = str(info.value)
    assert "unknown thing 'apgg'; did you mean 'apg'?" in text
    assert "Known thing names: apg, cfg, interval, samg" in text
    assert isinstance(info.value, KeyError)
    with pytest.raises(UnknownNameError, match="unknown thing 'zzzzzz' Known"):
        reg.get("zzzzzz")  # no close match, no suggestion


names_st = st.lists(st.from_regex(r"[a-z][a-z0-9\-]{0,10}", fullmatch=True), min_size=1, max_size=8, unique=True)


@given(names=names_st, missing=st.from_regex(r"[A-Z]{3,6}", fullmatch=True))
def test_registered_names_are_listed_sorted_and_unknowns_list_them_all(names: list[str], missing: str) -> None:
    reg, _ = fake_registry()
    objects = {n: object() for n in names}
    for n, obj in objects.items():
        reg.register(n, obj)
    assert reg.names() == sorted(names)
    assert all(reg.get(n) is objects[n] for n in names)
    assert all(n in reg for n in names) and missing not in reg and 3 not in reg
    with pytest.raises(UnknownNameError) as info:
        reg.get(missing)
    assert all(n in str(info.value) for n in names)


def test_names_filter_with_a_glob() -> None:
    assert gk.strategies.names("cfg*")[0] == "cfg"
    assert set(gk.strategies.names("*interval*")) >= {"interval"}
    assert all(n.startswith("cfg") for n in gk.strategies.names("cfg*"))


def test_builtin_strategies_are_registered_in_code() -> None:
    for name, cls in (("cfg", gk.CFG), ("apg", gk.APG), ("rescale", gk.Rescale), ("interval", gk.Interval)):
        assert STRATEGIES.get(name) is cls and STRATEGIES.origin(name) == "code"
        assert gk.strategies.get(name).registry_name == name


# -- canonical names and aliases (issue 18, defect 4) ---------------------------------------------------------
@pytest.fixture
def scratch_strategy() -> Iterator[type[gk.GuidanceStrategy]]:
    """A strategy class registered as ``test-scratch`` for the test and removed after it."""

    @dataclass(frozen=True)
    class Scratch(gk.CFG):
        pass

    STRATEGIES.register("test-scratch", Scratch)
    yield Scratch
    STRATEGIES.unregister("test-scratch")


def test_a_second_name_for_a_registered_class_is_an_alias_and_never_renames_it() -> None:
    STRATEGIES.register("test-classifier-free", gk.CFG)
    try:
        assert gk.to_spec(gk.CFG(3.0)).name == "cfg" and gk.CFG.registry_name == "cfg"
        assert gk.build({"name": "test-classifier-free", "params": {"scale": 2.0}}) == gk.CFG(2.0)
        assert "test-classifier-free" in STRATEGIES and STRATEGIES.origin("test-classifier-free") == "code"
        assert "test-classifier-free" not in STRATEGIES.names()  # each object listed once
        assert STRATEGIES.aliases()["test-classifier-free"] == "cfg"
        STRATEGIES.register("test-classifier-free", gk.CFG)  # the same alias again is harmless
        with pytest.raises(ConfigError, match=r"'test-classifier-free' is already an alias of 'cfg'.*override=True"):
            STRATEGIES.register("test-classifier-free", gk.APG)
    finally:
        STRATEGIES.unregister("test-classifier-free")
    assert gk.to_spec(gk.CFG(3.0)).name == "cfg" and STRATEGIES.get("cfg") is gk.CFG
    assert "test-classifier-free" not in STRATEGIES


def test_unregistering_a_name_leaves_specs_saved_meanwhile_a_clear_error(
    scratch_strategy: type[gk.GuidanceStrategy],
) -> None:
    STRATEGIES.register("test-scratch-alias", scratch_strategy)
    spec = gk.to_spec(scratch_strategy(2.0))
    assert spec.name == "test-scratch"
    STRATEGIES.unregister("test-scratch")
    assert "test-scratch-alias" not in STRATEGIES  # the aliases go with the object
    with pytest.raises(UnknownNameError, match=r"unknown strategy 'test-scratch' \(it was unregistered; register it"):
        gk.build(spec)
    with pytest.raises(ConfigError, match=r"obj: expected a registered dataclass component, got Scratch"):
        gk.to_spec(scratch_strategy(2.0))
    STRATEGIES.register("test-scratch", scratch_strategy)
    assert gk.build(spec) == scratch_strategy(2.0)


def test_override_gives_the_name_to_the_new_object_and_unnames_the_old(
    scratch_strategy: type[gk.GuidanceStrategy],
) -> None:
    @dataclass(frozen=True)
    class Other(gk.CFG):
        pass

    STRATEGIES.register("test-scratch", Other, override=True)
    try:
        assert STRATEGIES.get("test-scratch") is Other and gk.to_spec(Other(1.5)).name == "test-scratch"
        with pytest.raises(ConfigError, match="got Scratch, an unregistered subclass of CFG"):
            gk.to_spec(scratch_strategy(2.0))
    finally:
        STRATEGIES.register("test-scratch", scratch_strategy, override=True)  # for the fixture's cleanup


# -- plugins: isolation, per-group types, suggestions without imports (issue 18, defect 7) ---------------------
@pytest.fixture
def hostile_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Plugins that exit, interrupt or register the wrong kind of object, and one that records its import."""
    files = {
        "gk_fake_exit": "import sys\nsys.exit(3)\n",
        "gk_fake_interrupt": "raise KeyboardInterrupt\n",
        "gk_fake_recorded": "class Thing:\n    pass\n",
        "gk_fake_wrong": "import guidekit as gk\nNUMBER = 3\nSTRATEGY = gk.CFG\n",
    }
    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
        sys.modules.pop(name, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_a_plugin_exiting_at_import_becomes_a_warning_naming_it(hostile_plugins: Path) -> None:
    reg, _ = fake_registry(("exits", "gk_fake_exit:Thing"), ("fine", "gk_fake_recorded:Thing"))
    with pytest.warns(PluginWarning, match=r"'exits' \(gk_fake_exit:Thing\) .* failed to load: SystemExit: 3"):
        assert reg.names() == ["fine"]
    with pytest.raises(PluginError, match="'exits' comes from a plugin that failed to load: SystemExit"):
        reg.get("exits")


def test_a_keyboard_interrupt_at_plugin_import_still_interrupts(hostile_plugins: Path) -> None:
    reg, _ = fake_registry(("interrupts", "gk_fake_interrupt:Thing"))
    with pytest.raises(KeyboardInterrupt):
        reg.get("interrupts")


def test_a_typo_is_answered_from_entry_point_names_without_importing_plugins(hostile_plugins: Path) -> None:
    reg, _ = fake_registry(("cfg-plugin", "gk_fake_recorded:Thing"), ("exits", "gk_fake_exit:Thing"))
    reg.register("cfg", object())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no plugin is loaded, so none can warn
        with pytest.raises(
            UnknownNameError, match=r"'cfg-plugn'; did you mean 'cfg-plugin'\? .*cfg, cfg-plugin, exits"
        ):
            reg.get("cfg-plugn")
    assert "gk_fake_recorded" not in sys.modules and "gk_fake_exit" not in sys.modules


@pytest.mark.parametrize(
    ("obj", "got"),
    [(3, "int 3"), (object(), "object <object"), (gk.CFG, "the strategy class CFG"), (gk.CFG(2.0), "a strategy")],
)
def test_each_group_takes_only_its_own_kind_of_object(obj: object, got: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"energy estimator 'test-wrong': expected a subclass of .*EnergyEstimator.*got {got}"
    ):
        ENERGY.register("test-wrong", obj)
    assert "test-wrong" not in ENERGY


def test_a_plugin_registering_the_wrong_kind_of_object_is_skipped_by_name(hostile_plugins: Path) -> None:
    eps = [
        importlib_metadata.EntryPoint(name=n, value=v, group="guidekit.energy")
        for n, v in (("number", "gk_fake_wrong:NUMBER"), ("strategy", "gk_fake_wrong:STRATEGY"))
    ]
    reg = Registry("guidekit.energy", "energy estimator", entry_points=lambda group: eps, accepts=component_of_group)
    with pytest.warns(PluginWarning) as record:
        assert reg.names() == []
    messages = " | ".join(str(w.message) for w in record)
    assert "'number' (gk_fake_wrong:NUMBER)" in messages and "got int 3" in messages
    assert "'strategy' (gk_fake_wrong:STRATEGY)" in messages and "got the strategy class CFG" in messages
    with pytest.raises(PluginError, match="'number' comes from a plugin that registers the wrong kind of object"):
        reg.get("number")


def test_guidekit_list_takes_every_registry_group(capsys: pytest.CaptureFixture[str]) -> None:
    from guidekit.cli import main

    for group, registry in gk.REGISTRIES.items():
        assert main(["list", group]) == 0
        assert f"{group} ({len(registry.names())}):" in capsys.readouterr().out
