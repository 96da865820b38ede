"""models/README.md: the layout it shows is what training exports, file for file."""

from __future__ import annotations

import re

from tests.conftest import ROOT

ENTRY = re.compile(r"^ {6}(\S+)\s+(.*)$")  # a file or folder inside a version folder


def documented() -> dict[str, str]:
    """Each entry of the README's version folder → its description."""
    text = (ROOT / "models" / "README.md").read_text()
    return {m[1]: m[2] for m in map(ENTRY.match, text.splitlines()) if m}


def test_the_readme_lists_exactly_what_a_version_folder_holds(served_models):
    version = served_models / "mnist_cnn" / "1"
    exported = {p.name + "/" * p.is_dir() for p in version.iterdir()}
    assert set(documented()) == exported


def test_the_readme_names_each_plot_exported(served_models):
    plots = served_models / "mnist_cnn" / "1" / "plots"
    assert set(re.findall(r"\w+\.png", documented()["plots/"])) == {
        p.name for p in plots.iterdir()}
