"""The schema gate's comparison: what a new job model may and may not change, named by field.

Schemas come from real pydantic models (``model_json_schema()``), as the instances publish them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from {{ cookiecutter.__package_name }}.runtime.evolve.contract_gate import breaking_changes
from {{ cookiecutter.__package_name }}.runtime.evolve.rollout import Gates, LaneFigures, analyse
from {{ cookiecutter.__package_name }}.runtime.operate.demo import DemoJob, DemoJobWithRequiredField


class Address(BaseModel):
    city: str
    zip: str | None = None


class Old(BaseModel):
    id: str
    quantity: int = Field(default=1, ge=1)
    note: str | None = None
    colour: str = "red"
    address: Address | None = None
    tags: list[str] = []


def problems(new: type[BaseModel], old: type[BaseModel] = Old) -> list[str]:
    return breaking_changes(old.model_json_schema(), new.model_json_schema())


def test_the_same_model_and_a_new_optional_field_are_compatible() -> None:
    class Same(Old):
        pass

    class MoreOptional(Old):
        priority: int = 0

    class Wider(Old):
        quantity: int | float = Field(default=1, ge=0)  # type: ignore[assignment]

    assert problems(Same) == []
    assert problems(MoreOptional) == []
    assert problems(Wider) == []


def test_a_new_required_field_is_named() -> None:
    class NewRequired(Old):
        priority: int

    assert problems(NewRequired) == ["priority: new required field"]


def test_a_removed_field_is_named() -> None:
    class Removed(BaseModel):
        id: str
        quantity: int = Field(default=1, ge=1)
        colour: str = "red"
        address: Address | None = None
        tags: list[str] = []

    assert problems(Removed) == ["note: field removed"]


def test_narrowed_types_are_named() -> None:
    class StrToInt(Old):
        colour: int = 1  # type: ignore[assignment]

    class NoLongerOptional(Old):
        note: str = ""

    class NestedNarrowed(Old):
        tags: list[int] = []  # type: ignore[assignment]

    assert problems(StrToInt) == ["colour: type narrowed from string to integer"]
    assert problems(NoLongerOptional) == ["note: type narrowed from null | string to string"]
    assert problems(NestedNarrowed) == ["tags[]: type narrowed from string to integer"]


def test_an_enum_restriction_and_a_tighter_bound_are_named() -> None:
    class Colour(StrEnum):
        red = "red"
        blue = "blue"

    class Enumerated(Old):
        colour: Colour = Colour.red

    class LiteralColour(Old):
        colour: Literal["red"] = "red"

    class Tighter(Old):
        quantity: int = Field(default=1, ge=1, le=10)

    class Lower(Old):
        quantity: int = Field(default=5, ge=5)

    assert problems(Enumerated) == ['colour: now restricted to ["red", "blue"]']
    assert problems(LiteralColour) == ['colour: now restricted to ["red"]']
    assert problems(Tighter) == ["quantity: maximum tightened to 10 (was none)"]
    assert problems(Lower) == ["quantity: minimum tightened to 5 (was 1)"]


def test_nested_models_are_compared_through_their_refs() -> None:
    class StrictAddress(BaseModel):
        city: str
        zip: str
        country: str

    class Nested(Old):
        address: StrictAddress | None = None  # type: ignore[assignment]

    assert problems(Nested) == [
        "address.country: new required field",
        "address.zip: new required field",
        "address.zip: type narrowed from null | string to string",
    ]


def test_forbidding_extra_fields_is_breaking() -> None:
    class Strict(Old):
        model_config = ConfigDict(extra="forbid")

    assert problems(Strict) == ["the job: extra fields are now forbidden"]


def test_the_demo_variant_used_by_the_rollout_tests_breaks_the_demo_contract() -> None:
    assert problems(DemoJobWithRequiredField, DemoJob) == ["priority: new required field"]
    assert problems(DemoJob, DemoJob) == []


def test_the_analysis_waits_for_enough_jobs_and_fails_early_on_enough_failures() -> None:
    gates = Gates(min_jobs=20, max_failure_rate=0.05)
    stable = LaneFigures(succeeded=500, failed=0)
    assert analyse(gates, LaneFigures(succeeded=5), stable)[0] == "Inconclusive"
    assert analyse(gates, LaneFigures(succeeded=30), stable)[0] == "Successful"
    # 4 failures are over 5 % of 20 even if every unseen try succeeds: no need to wait.
    verdict, reason = analyse(gates, LaneFigures(succeeded=6, failed=4), stable)
    assert verdict == "Failed"
    assert "judged over --min-jobs 20" in reason
    # The stable lane failing as much is not the new lane's fault.
    noisy = LaneFigures(succeeded=80, failed=20)
    assert analyse(gates, LaneFigures(succeeded=40, failed=10), noisy)[0] == "Successful"
    slow = LaneFigures(succeeded=30, p95_ms=400.0)
    assert analyse(gates, slow, LaneFigures(succeeded=30, p95_ms=50.0))[0] == "Failed"
    assert analyse(gates, slow, LaneFigures(succeeded=30, p95_ms=250.0))[0] == "Successful"
