"""Percentage routing as pure functions: bucket ranking, filters, stickiness, key tokens."""

from __future__ import annotations

import random
import re
import uuid

import pytest

from {{ cookiecutter.__package_name }}.runtime.evolve.split import (
    BUCKETS,
    RANK,
    Split,
    bucket_of,
    fnv1a32,
    generation_filters,
)
from {{ cookiecutter.__package_name }}.runtime.naming import key_token
from {{ cookiecutter.__package_name }}.runtime.settings import load_settings

PREFIX = "shop.notify.g7"


def matches(pattern: str, subject: str) -> bool:
    """NATS wildcard matching: ``*`` one token, ``>`` the rest."""
    p, s = pattern.split("."), subject.split(".")
    for i, part in enumerate(p):
        if part == ">":
            return len(s) > i
        if i >= len(s) or part not in ("*", s[i]):
            return False
    return len(p) == len(s)


def overlap(p: str, q: str) -> bool:
    """Whether some subject matches both filters, judged by their wildcards alone (as
    JetStream judges a work-queue stream's consumers)."""
    a, b = p.split("."), q.split(".")
    for i in range(min(len(a), len(b))):
        if ">" in (a[i], b[i]):
            return True
        if "*" not in (a[i], b[i]) and a[i] != b[i]:
            return False
    return len(a) == len(b)


def stored(bucket: int, *, keyed: bool) -> str:
    """A stored subject in ``bucket``, as the route transform writes it."""
    if keyed:
        return f"{PREFIX}.{bucket % 10}.{bucket}.3.8.notify.some-key"
    return f"{PREFIX}.5.55.{bucket % 10}.{bucket // 10}.notify"


def test_fnv1a32_matches_the_reference_vectors() -> None:
    assert fnv1a32(b"") == 0x811C9DC5
    assert fnv1a32(b"a") == 0xE40C292C
    assert fnv1a32(b"foobar") == 0xBF9CF968


def test_the_ranking_is_a_permutation_of_the_buckets() -> None:
    assert sorted(RANK) == list(range(BUCKETS))
    assert RANK[:10] == (0, 10, 20, 30, 40, 50, 60, 70, 80, 90)  # one ones-digit first


@pytest.mark.parametrize("percent", [1, 5, 10, 25, 37, 50, 63, 90, 99, 100])
@pytest.mark.parametrize("keyed", [True, False])
def test_each_bucket_belongs_to_exactly_one_lane(percent: int, keyed: bool) -> None:
    split = Split(current="v1", ramping="v2", percent=percent)
    filters = {
        lane: generation_filters(PREFIX, "notify", split.ranks(lane)) for lane in ("v1", "v2")
    }
    for lane_filters in filters.values():
        assert len([f for f in lane_filters if f.endswith(".*")]) <= 19 or len(lane_filters) == 1
    clashes = [(p, q) for p in filters["v1"] for q in filters["v2"] if overlap(p, q)]
    assert not clashes, clashes[:3]  # a work-queue stream refuses overlapping consumers
    owned = {"v1": 0, "v2": 0}
    for bucket in range(BUCKETS):
        owners = [
            lane
            for lane, fs in filters.items()
            if any(matches(f, stored(bucket, keyed=keyed)) for f in fs)
        ]
        assert owners == [split.lane_of_bucket(bucket)], (bucket, owners)
        owned[owners[0]] += 1
    assert owned == {"v2": percent, "v1": 100 - percent}


def test_a_key_on_the_new_lane_stays_there_while_the_ramp_grows() -> None:
    keys = [uuid.uuid4().hex for _ in range(2000)]
    previous: set[str] = set()
    for percent in (1, 5, 10, 25, 50, 75, 99, 100):
        split = Split(current="v1", ramping="v2", percent=percent)
        on_v2 = {k for k in keys if split.lane_of_bucket(bucket_of(f"r.jobs.t.{k}")) == "v2"}
        assert previous <= on_v2, f"keys left v2 when the ramp grew to {percent}%"
        previous = on_v2


@pytest.mark.parametrize("percent", [1, 10, 25, 50, 90])
def test_ten_thousand_keys_split_within_two_points(percent: int) -> None:
    rng = random.Random(percent)  # noqa: S311 - test data
    keys = [f"order-{rng.getrandbits(48):012x}" for _ in range(10_000)]
    split = Split(current="v1", ramping="v2", percent=percent)
    on_v2 = sum(split.lane_of_bucket(bucket_of(f"shop.jobs.notify.{k}")) == "v2" for k in keys)
    assert abs(on_v2 / 100 - percent) <= 2, (percent, on_v2 / 100)


def test_shares_add_up_and_name_the_lanes() -> None:
    split = Split(current="v1", ramping="v2", percent=10)
    assert (split.share("v1"), split.share("v2"), split.share("v3")) == (90, 10, 0)
    assert Split(current="v2").share("v2") == 100
    assert Split.from_dict(split.as_dict()) == split
    with pytest.raises(ValueError, match="percent"):
        Split(current="v1", ramping="v2", percent=101)


@pytest.mark.parametrize(
    "key", ["A-1", "a.b", "with space", "*", ">", "ключ", "x" * 300, "", "b64-abc"]
)
def test_any_key_becomes_one_stable_subject_token(key: str) -> None:
    token = key_token(key) if key else "A"
    assert re.fullmatch(r"[A-Za-z0-9_=-]{1,64}", token), token
    assert key_token(key or "A") == token  # deterministic


def test_stored_subjects_lead_back_to_their_ingress() -> None:
    names = load_settings(subject_root="shop", job_type="notify").names
    assert names.ingress_for_stored("shop.notify.g3.1.41.0.2.notify.K-9") == "shop.jobs.notify.K-9"
    assert names.ingress_for_stored("shop.notify.g3.1.41.0.2.notify") == "shop.jobs.notify"
    assert names.ingress_for_stored("shop.v1.notify") == "shop.jobs.notify"  # legacy layout
    assert names.gen_of_route(names.route_dest(12)) == 12
    assert names.legacy_lane_of_route("shop.v1.>") == "v1"
    assert names.legacy_lane_of_route(names.route_dest(1)) is None


def test_unkeyed_jobs_on_a_replicated_stream_get_one_bucket_the_current_lane_keeps() -> None:
    """Every replica applies the transform itself: a random token would differ per replica."""
    names = load_settings(subject_root="shop", job_type="notify").names
    single, replicated = names.route_dest(4), names.route_dest(4, replicated=True)
    assert "random" in single
    assert "random" not in replicated
    assert "partition(100)" in replicated
    assert names.gen_of_route(replicated) == 4
    r1, r2 = (int(t) for t in replicated.split(".")[-3:-1])
    bucket = r1 + 10 * r2  # as the unkeyed filters read it
    for percent in range(1, 100):
        assert Split("v1", "v2", percent).lane_of_bucket(bucket) == "v1", percent
