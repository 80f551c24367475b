"""PrunePlan: which blocks of which model are kept, and why. JSON round trip; refuses foreign models.

A plan refuses non-finite numbers (a NaN score would sort anywhere and silently keep the wrong blocks) and
its JSON is strict (no bare NaN). `already_dropped` records blocks the scored model skipped before Stage I
(a plan made on a model that already ran with a plan): they are never kept, whatever their score.
A two-expert model (Wan 2.2 A14B) has one plan per expert, each scored on the expert's part of the schedule, in
one file of its own format (`ExpertPlans`); `read_plan` gives one expert's plan from either kind of file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .adapters.base import ModelFingerprint
from .experts import EXPERTS, check_boundary
from .io_utils import atomic_write_text

PLAN_FORMAT = "fastlightgen.prune_plan/1"
EXPERT_PLANS_FORMAT = "fastlightgen.expert_plans/1"
STAGE1_NAN_HINT = ("Stage I produced NaN or inf (the model's output overflowed or holds NaN weights): rerun it "
                   "in a wider dtype or on an intact checkpoint")


class PlanMismatchError(ValueError):
    """A plan applied to a model it was not made for."""


def check_block_numbers(name: str, blocks: Sequence[int], num_blocks: int) -> None:
    """Block numbers count from 0 in the model as it was given: an error naming the numbers out of range."""
    bad = sorted(i for i in blocks if not 0 <= i < num_blocks)
    if bad:
        raise ValueError(f"{name} blocks {bad} do not exist in a model of {num_blocks} blocks (blocks are numbered "
                         f"0..{num_blocks - 1}, counting from 0)")


@dataclass
class PrunePlan:
    fingerprint: ModelFingerprint
    kept: list[int]
    method: str = "explicit"  # "scores" (Stage I ranking) or "explicit" (a block list)
    keep_ratio: float | None = None
    protected: list[int] = field(default_factory=list)
    scores: list[float] | None = None
    reference_error: float | None = None
    already_dropped: list[int] = field(default_factory=list)

    def __post_init__(self):
        n = self.fingerprint.num_blocks
        self.kept = _blocks("kept", self.kept)
        self.already_dropped = _blocks("already_dropped", self.already_dropped)
        check_block_numbers("kept", self.kept, n)
        if not self.kept:
            raise ValueError(f"a prune plan must keep at least one of the model's {n} blocks; got none")
        if self.scores is not None and len(self.scores) != n:
            raise ValueError(f"the plan has {len(self.scores)} scores for {n} blocks")
        _check_finite("scores", self.scores or [], STAGE1_NAN_HINT)
        _check_finite("reference_error", [] if self.reference_error is None else [self.reference_error],
                      STAGE1_NAN_HINT)
        _check_finite("keep_ratio", [] if self.keep_ratio is None else [self.keep_ratio], "give a number in (0, 1]")
        revived = sorted(set(self.kept) & set(self.already_dropped))
        if revived:
            raise ValueError(f"the plan keeps blocks {revived} that its model had already dropped")

    @property
    def dropped(self) -> list[int]:
        return [i for i in range(self.fingerprint.num_blocks) if i not in set(self.kept)]

    @property
    def skip(self) -> frozenset[int]:
        return frozenset(self.dropped)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_scores(cls, fingerprint: ModelFingerprint, scores: Sequence[float], keep_ratio: float | None = None,
                    keep_count: int | None = None, protected: Sequence[int] = (),
                    reference_error: float | None = None, already_dropped: Sequence[int] = ()) -> "PrunePlan":
        """Keep the highest-scoring blocks (largest error when skipped = most important), plus `protected`.

        With `already_dropped`, the ratio or count is of the blocks the model still runs, and only those are kept.
        """
        n = fingerprint.num_blocks
        _check_finite("scores", scores, STAGE1_NAN_HINT)
        dropped = sorted(set(int(i) for i in already_dropped))
        active = [i for i in range(n) if i not in dropped]
        count = count_kept(len(active), keep_ratio, keep_count)
        protected = sorted(set(int(i) for i in protected))
        check_block_numbers("protected", protected, n)
        if set(protected) & set(dropped):
            raise ValueError(f"protected blocks {sorted(set(protected) & set(dropped))} are already dropped")
        if len(protected) > count:
            raise ValueError(f"{len(protected)} protected blocks do not fit in a plan keeping {count}")
        ranked = sorted(active, key=lambda i: -scores[i])
        kept = list(protected) + [i for i in ranked if i not in protected][: count - len(protected)]
        return cls(fingerprint, kept, "scores", count / n, protected, [float(s) for s in scores], reference_error,
                   dropped)

    @classmethod
    def from_blocks(cls, fingerprint: ModelFingerprint, dropped: Sequence[int]) -> "PrunePlan":
        n = fingerprint.num_blocks
        check_block_numbers("dropped", [int(i) for i in dropped], n)
        kept = [i for i in range(n) if i not in set(int(d) for d in dropped)]
        return cls(fingerprint, kept, "explicit", len(kept) / n)

    # ---- checks ----------------------------------------------------------------------------------
    def check(self, fingerprint: ModelFingerprint) -> None:
        if fingerprint != self.fingerprint:
            raise PlanMismatchError(f"this prune plan was made for a {self.fingerprint}, but the model is a "
                                    f"{fingerprint}; run Stage I on this model to get its own plan")

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": PLAN_FORMAT, "fingerprint": self.fingerprint.to_dict(), "kept": self.kept,
             "dropped": self.dropped, "method": self.method, "keep_ratio": self.keep_ratio,
             "protected": self.protected, "scores": self.scores, "reference_error": self.reference_error}
        if self.already_dropped:  # only then: a plain plan's JSON stays what every reader of format 1 knows
            d["already_dropped"] = self.already_dropped
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PrunePlan":
        if d.get("format") == EXPERT_PLANS_FORMAT:
            raise ValueError(f"this plan holds one plan per expert ({', '.join(d.get('experts', {}))}) of a "
                             "two-expert model: choose the expert (train.stage2: stage2.expert)")
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"not a FastLightGen prune plan (format {d.get('format')!r}, expected {PLAN_FORMAT!r})")
        try:
            plan = cls(ModelFingerprint.from_dict(d["fingerprint"]), d["kept"], d["method"], d.get("keep_ratio"),
                       d.get("protected", []), d.get("scores"), d.get("reference_error"), d.get("already_dropped", []))
        except KeyError as err:
            raise ValueError(f"prune plan lacks the field {err}; use a plan.json written by FastLightGen") from None
        except TypeError as err:  # a field of the wrong type, e.g. a string where a number belongs
            raise ValueError(f"prune plan has a field of the wrong type ({err}); use a plan.json written by "
                             "FastLightGen") from None
        if "dropped" in d and sorted(d["dropped"]) != plan.dropped:
            raise ValueError("prune plan is inconsistent: 'dropped' is not the complement of 'kept'")
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        return cls.from_json(Path(path).read_text())


@dataclass
class ExpertPlans:
    """The plans of a two-expert model, by expert name (`fastlightgen.experts.EXPERTS`), and the boundary sigma
    between the parts of the schedule they were scored on."""
    boundary: float
    plans: dict[str, PrunePlan]

    def __post_init__(self):
        check_boundary(self.boundary)
        if sorted(self.plans) != sorted(EXPERTS):
            raise ValueError(f"a two-expert plan needs a plan for each of {', '.join(EXPERTS)}, got "
                             f"{', '.join(self.plans) or 'none'}")

    def to_dict(self) -> dict:
        return {"format": EXPERT_PLANS_FORMAT, "boundary": self.boundary,
                "experts": {name: self.plans[name].to_dict() for name in EXPERTS}}

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertPlans":
        if d.get("format") != EXPERT_PLANS_FORMAT:
            raise ValueError(f"not a FastLightGen two-expert plan (format {d.get('format')!r}, expected "
                             f"{EXPERT_PLANS_FORMAT!r})")
        try:
            return cls(float(d["boundary"]), {name: PrunePlan.from_dict(plan) for name, plan in d["experts"].items()})
        except (KeyError, AttributeError) as err:
            raise ValueError(f"two-expert plan lacks {err}; use a plan.json written by FastLightGen") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_json())


def read_plan(path: str | Path, expert: str | None = None) -> PrunePlan:
    """The plan in a plan.json: a one-expert plan (`expert` None), or `expert`'s plan of a two-expert one."""
    d = json.loads(Path(path).read_text())
    if expert is None:
        return PrunePlan.from_dict(d)
    if d.get("format") == PLAN_FORMAT:
        raise ValueError(f"{path} is the plan of a one-expert model, not of {expert!r}: run Stage I on the "
                         "two-expert model for its plans")
    return ExpertPlans.from_dict(d).plans[expert]


def count_kept(n: int, keep_ratio: float | None = None, keep_count: int | None = None) -> int:
    """How many of `n` blocks a plan keeps at `keep_ratio` (or `keep_count`); an error when that is not 1..n."""
    if (keep_ratio is None) == (keep_count is None):
        raise ValueError("give exactly one of keep_ratio or keep_count")
    if keep_count is None:
        if not 0 < keep_ratio <= 1:  # also refuses NaN
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        keep_count = max(1, round(keep_ratio * n))
    if not 1 <= keep_count <= n:
        raise ValueError(f"keep_count must be in 1..{n}, got {keep_count}")
    return keep_count


def _blocks(name: str, values) -> list[int]:
    try:
        return sorted(set(int(i) for i in values))
    except (TypeError, ValueError):
        raise ValueError(f"a prune plan's {name} must be a list of block numbers, got {values!r}") from None


def _check_finite(name: str, values: Sequence[float], fix: str) -> None:
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"the prune plan's {name} must be finite, but entries {bad} are "
                         f"{[values[i] for i in bad][:4]}; {fix}")
