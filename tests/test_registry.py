"""The registry: lazy entry points (injected fakes), duplicates, unknown names, broken plugins."""

from __future__ import annotations

import sys
import textwrap
import warnings
from pathlib import Path

import importlib_metadata
import pytest
from hypothesis import given
from hypothesis import strategies as st

import guidekit as gk
from guidekit.errors import ConfigError, PluginError, UnknownNameError
from guidekit.registry import STRATEGIES, PluginWarning, Registry

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
