"""app/version_policy.py: TF Serving's version policies, parsed from one setting."""

from __future__ import annotations

import pytest

from app.version_policy import VersionPolicy

PRESENT = [1, 2, 5, 9]


@pytest.mark.parametrize(("text", "candidates", "limit"), [
    ("latest", [9, 5, 2, 1], 1),
    (" Latest ", [9, 5, 2, 1], 1),
    ("latest:2", [9, 5, 2, 1], 2),
    ("all", [9, 5, 2, 1], None),
    ("5,1", [5, 1], None),
    ("1, 5, 7", [5, 1], None),
])
def test_each_form_gives_its_candidates_highest_first(text, candidates, limit):
    policy = VersionPolicy.parse(text)
    assert policy.candidates(PRESENT) == candidates
    assert policy.limit == limit


def test_latest_n_is_satisfied_after_n_and_all_never():
    assert VersionPolicy.parse("latest:2").satisfied(2)
    assert not VersionPolicy.parse("latest:2").satisfied(1)
    assert not VersionPolicy.parse("all").satisfied(1000)


@pytest.mark.parametrize("text", ["", "newest", "latest:0", "latest:x", "1,,2", "-1", "1.5"])
def test_other_text_is_refused_with_the_accepted_forms(text):
    with pytest.raises(ValueError, match="'latest', 'latest:N', 'all' or a list"):
        VersionPolicy.parse(text)
