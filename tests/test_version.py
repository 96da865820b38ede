"""One version number, defined once in app/__init__.py."""

from __future__ import annotations

import re

from setuptools.config.pyprojecttoml import read_configuration

import app
from app.config import Config
from app.openapi import openapi_spec
from tests.conftest import ROOT


def test_the_package_version_is_the_apps():
    project = read_configuration(ROOT / "pyproject.toml", expand=True)["project"]
    assert project["version"] == app.__version__
    assert openapi_spec(Config())["info"]["version"] == app.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", app.__version__)


def test_no_other_file_spells_a_version_of_its_own():
    sources = [ROOT / "pyproject.toml", *(ROOT / "app").rglob("*.py")]
    spelled = [path for path in sources
               if re.search(r"""version(__)?\s*=\s*["']\d+\.\d+""", path.read_text())]
    assert spelled == [ROOT / "app" / "__init__.py"]
