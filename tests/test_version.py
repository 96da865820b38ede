"""One version number, defined once in app/__init__.py."""

from __future__ import annotations

import re

from setuptools.config.pyprojecttoml import read_configuration

from app import create_app
from app.config import Config
from tests.conftest import ROOT

# The one definition, read as text: what every other place must report.
DEFINED = re.search(r'^__version__ = "(\d+\.\d+\.\d+)"$',
                    (ROOT / "app" / "__init__.py").read_text(), re.MULTILINE).group(1)


def test_the_package_and_the_running_app_report_the_defined_version(tmp_path):
    project = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]
    assert project["version"] == DEFINED
    client = create_app(Config(models_dir=tmp_path)).test_client()
    assert client.get("/openapi.json").get_json()["info"]["version"] == DEFINED
    assert client.get("/v2").get_json()["version"] == DEFINED


def test_no_other_file_spells_a_version_of_its_own():
    sources = [ROOT / "pyproject.toml", *(ROOT / "app").rglob("*.py")]
    spelled = [path for path in sources
               if re.search(r"""version(__)?\s*=\s*["']\d+\.\d+""", path.read_text())]
    assert spelled == [ROOT / "app" / "__init__.py"]
