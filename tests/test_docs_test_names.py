"""The tests the documents cite as evidence exist: README.md, RELIABILITY.md,
BENCHMARKS.md and models/README.md name tests beside their figures, and a test renamed
afterwards leaves a figure that no test backs (README's swap-memory row named one for
weeks after it was replaced)."""

from __future__ import annotations

import re

from tests.conftest import ROOT

DOCUMENTS = ("README.md", "RELIABILITY.md", "BENCHMARKS.md", "models/README.md")


def cited_names() -> set[str]:
    """Every ``test_...`` word in the documents: a test module's stem or a test's name."""
    text = "\n".join((ROOT / document).read_text() for document in DOCUMENTS)
    return set(re.findall(r"\btest_[a-z0-9_]*[a-z0-9]", text))


def defined_names() -> set[str]:
    """The stems of the test modules and the names of the tests defined in them."""
    names = set()
    for module in (ROOT / "tests").rglob("test_*.py"):
        names.add(module.stem)
        names.update(re.findall(r"^\s*def (test_\w+)\(", module.read_text(), flags=re.M))
    return names


def test_every_test_the_documents_cite_exists():
    assert sorted(cited_names() - defined_names()) == []
