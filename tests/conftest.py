import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgkit.plugins import plugins

HERE = Path(__file__).parent
PLUGIN_SOURCES = [HERE / "plugins" / "example", HERE / "plugins" / "broken"]


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory) -> Path:
    """A folder into which pip installs the example (and a broken) plugin distribution,
    exactly as a user's ``pip install`` would: dist-info, entry_points.txt and all."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), *map(str, PLUGIN_SOURCES)],
        check=True,
    )
    return site


@pytest.fixture
def installed_plugins(plugin_site, monkeypatch):
    """Put the installed plugins on sys.path (and PYTHONPATH for subprocesses)."""
    monkeypatch.syspath_prepend(str(plugin_site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(plugin_site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    importlib.invalidate_caches()
    plugins.cache_clear()
    yield plugin_site
    plugins.cache_clear()


@pytest.fixture(autouse=True)
def _quiet_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # runs/ lands in the test's own folder
