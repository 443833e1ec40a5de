"""Percentage routing: which lane owns which of the 100 buckets, as pure functions.

A job's bucket is fixed when the stream stores it. Keyed jobs (``<root>.jobs.<type>.<key>``) get
``FNV-1a-32(subject) mod 100``, the server's ``partition(100)`` of the whole ingress subject, so
one key always lands in one bucket; unkeyed jobs get two ``random(10)`` digits. The stored
subject carries the bucket twice, as its ones digit and as the whole number, so that a lane can
own ten buckets with one filter and a single bucket with another:

    <root>.<type>.g<gen>.<p10>.<p100>.<r1>.<r2>.<type>[.<key>]

Buckets are ranked (``RANK``): the ramping lane owns the first ``percent`` of them, the current
lane the rest. A lane's set only grows while its percentage grows, so a key that moved to the new
version stays there for the rest of the ramp (sticky, like Temporal's ramp). Any split needs at
most 19 filters per lane and generation for keyed jobs, and as many for unkeyed ones.
"""

from __future__ import annotations

from dataclasses import dataclass

BUCKETS = 100
# Rank i -> bucket: all buckets with ones digit 0 first (0, 10, ..., 90), then digit 1, ...
RANK = tuple((i // 10) + 10 * (i % 10) for i in range(BUCKETS))
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193


def fnv1a32(data: bytes) -> int:
    """The hash nats-server's ``partition()`` subject transform uses."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def bucket_of(ingress_subject: str) -> int:
    """The bucket the server assigns a keyed job published to ``ingress_subject``."""
    return fnv1a32(ingress_subject.encode()) % BUCKETS


@dataclass(frozen=True)
class Split:
    """Who gets new work: ``ramping`` takes ``percent`` of the buckets, ``current`` the rest."""

    current: str
    ramping: str | None = None
    percent: int = 0  # of new work to ``ramping``

    def __post_init__(self) -> None:
        if not 0 <= self.percent <= 100:
            raise ValueError(f"percent must be 0..100, not {self.percent}")

    def share(self, lane: str) -> int:
        """Percent of new work ``lane`` gets."""
        if lane == self.ramping:
            return self.percent
        if lane == self.current:
            return 100 - (self.percent if self.ramping else 0)
        return 0

    def ranks(self, lane: str) -> range:
        """The ranks (see ``RANK``) of the buckets ``lane`` owns: a contiguous range."""
        ramp = self.percent if self.ramping else 0
        if lane == self.ramping:
            return range(0, ramp)
        if lane == self.current:
            return range(ramp, BUCKETS)
        return range(0)

    def lane_of_bucket(self, bucket: int) -> str:
        rank = RANK.index(bucket)
        if self.ramping and rank < self.percent:
            return self.ramping
        return self.current

    @property
    def lanes(self) -> tuple[str, ...]:
        return tuple(lane for lane in (self.current, self.ramping) if lane and self.share(lane))

    def as_dict(self) -> dict[str, object]:
        return {"current": self.current, "ramping": self.ramping, "percent": self.percent}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Split:
        ramping = data.get("ramping")
        return cls(
            current=str(data["current"]),
            ramping=str(ramping) if ramping else None,
            percent=int(str(data.get("percent", 0))),
        )


def _digits_and_singles(ranks: range) -> tuple[list[int], list[int]]:
    """Whole ones-digits (10 buckets each) and single buckets covering ``ranks``."""
    digits: list[int] = []
    singles: list[int] = []
    for digit in range(10):
        inside = [r for r in range(10 * digit, 10 * digit + 10) if r in ranks]
        if len(inside) == 10:
            digits.append(digit)
        else:
            singles.extend(RANK[r] for r in inside)
    return digits, singles


def generation_filters(prefix: str, job_type: str, ranks: range) -> list[str]:
    """Filters on ``<prefix>`` (``<root>.<type>.g<gen>``) for the buckets of ``ranks``."""
    if len(ranks) == BUCKETS:
        return [f"{prefix}.>"]
    digits, singles = _digits_and_singles(ranks)
    keyed = [f"{prefix}.{d}.*.*.*.{job_type}.*" for d in digits]
    # A single bucket pins its ones digit too: JetStream checks filters for overlap by their
    # wildcards alone, and "*.<b>" would overlap another lane's "<digit>.*".
    keyed += [f"{prefix}.{b % 10}.{b}.*.*.{job_type}.*" for b in singles]
    unkeyed = [f"{prefix}.*.*.{d}.*.{job_type}" for d in digits]
    unkeyed += [f"{prefix}.*.*.{b % 10}.{b // 10}.{job_type}" for b in singles]
    return keyed + unkeyed
