"""The docs site builds without warnings, and the plugin guide shows the tested files."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_with_warnings_as_errors(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    command = [str(mkdocs)] if mkdocs.exists() else [shutil.which("mkdocs") or "mkdocs"]
    proc = subprocess.run([*command, "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "plugins" / "index.html").is_file()


def test_the_plugin_guide_shows_exactly_the_tested_example_plugin():
    guide = (ROOT / "docs" / "plugins.md").read_text()
    blocks = re.findall(r"^`(tests/plugins/example/[^`]+)`\n```\w*\n(.*?)```$", guide, re.M | re.S)
    shown = {path for path, _ in blocks}
    assert shown == {"tests/plugins/example/pyproject.toml",
                     "tests/plugins/example/dgkit_example/__init__.py"}
    for path, code in blocks:
        assert code == (ROOT / path).read_text(), f"docs/plugins.md shows another {path}"


def test_the_readme_links_only_to_pages_that_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links, "the README links to the docs"
    for link in links:
        assert (ROOT / link).is_file(), link
