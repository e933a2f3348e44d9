import pytest

from dgkit import hookimpl
from dgkit.errors import PluginError, UnknownAliasError
from dgkit.plugins import load_plugins, registry


def test_builtins_register_through_entry_points():
    algos, data, metrics = registry("algorithm"), registry("dataset"), registry("metric")
    assert "erm" in algos and {"rotated_mnist", "colored_mnist"} <= set(data.entries)
    assert "accuracy" in metrics
    erm = algos.get("erm")
    assert erm.distribution == "dgkit" and erm.plugin == "algorithms"
    assert erm.target == "dgkit_algorithms.erm.ERM"
    assert algos.get("ERM") is erm  # aliases are case-insensitive


def test_unknown_alias_lists_known_and_closest():
    with pytest.raises(UnknownAliasError) as info:
        registry("algorithm").get("ermm")
    message = str(info.value)
    assert "unknown algorithm 'ermm'" in message
    assert "Did you mean 'erm'?" in message
    known = message.split("Known algorithms: ")[1]
    assert {"erm", "sam", "udim"} <= set(known.rstrip(".").split(", "))


class _Clash:
    @hookimpl
    def dgkit_algorithms(self):
        return {"erm": object}


class _Raises:
    @hookimpl
    def dgkit_datasets(self):
        raise RuntimeError("cannot find my files")


def test_duplicate_alias_names_both_plugins():
    with pytest.raises(PluginError, match=r"'erm' is registered twice.*'algorithms'.*'clash'"):
        load_plugins(extra={"clash": _Clash()})


def test_plugin_raising_in_hook_is_reported_and_others_survive():
    loaded = load_plugins(extra={"raises": _Raises()})
    assert [f.plugin for f in loaded.failures] == ["raises"]
    assert "cannot find my files" in loaded.failures[0].error
    assert "rotated_mnist" in loaded["dataset"]  # the built-ins still registered


def test_installed_plugin_registers_and_broken_one_is_reported(installed_plugins):
    loaded = load_plugins()
    entry = loaded["algorithm"].get("manual_erm")
    assert entry.distribution == "dgkit-example-plugin" and entry.plugin == "example"
    broken = [f for f in loaded.failures if f.plugin == "broken"]
    assert broken and broken[0].distribution == "dgkit-broken-plugin"
    assert "a_dependency_that_is_not_installed" in broken[0].error
    assert "erm" in loaded["algorithm"]


def test_public_api_names_all_exist():
    import dgkit

    for name in dgkit.__all__:
        assert hasattr(dgkit, name), name
