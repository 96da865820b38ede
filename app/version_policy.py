"""Which versions of each model to load: TensorFlow Serving's model version policy.

``MODEL_VERSION_POLICY`` takes one of

- ``latest`` (default): the highest complete version;
- ``latest:N``: the N highest complete versions (a canary next to the current one);
- ``all``: every complete version;
- ``1,3`` (a comma-separated list): exactly those versions, where they are complete.

A version that fails its checks is skipped, so ``latest`` falls back to the next lower
one instead of serving nothing — as TF Serving keeps serving what it has.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VersionPolicy:
    """Parsed policy: candidates in the order tried, and how many to keep at most."""

    text: str
    limit: int | None = 1
    versions: frozenset[int] | None = None  # None: any version is a candidate

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """Raises ValueError with the accepted forms when ``text`` is none of them."""
        spec = text.strip().lower()
        if spec == "latest":
            return cls("latest", 1)
        if spec == "all":
            return cls("all", None)
        if spec.startswith("latest:"):
            count = spec.removeprefix("latest:")
            if count.isdigit() and int(count) >= 1:
                return cls(spec, int(count))
        elif spec and all(part.strip().isdigit() for part in spec.split(",")):
            versions = frozenset(int(part) for part in spec.split(","))
            return cls(",".join(map(str, sorted(versions))), None, versions)
        raise ValueError(f"expected 'latest', 'latest:N', 'all' or a list of versions "
                         f"such as '1,3', got {text!r}")

    def candidates(self, present: list[int]) -> list[int]:
        """The present versions this policy may load, highest first."""
        ordered = sorted(present, reverse=True)
        return ordered if self.versions is None else [v for v in ordered if v in self.versions]

    def satisfied(self, loaded: int) -> bool:
        """True once enough versions are loaded to stop trying lower ones."""
        return self.limit is not None and loaded >= self.limit
