"""What a finished Stage II or III run produced: `StageRecord`, written beside its model.safetensors as run.json.

The one hand-off between stages: Stage II and III write it, export, the models and research read it, and nothing
reads a stage's output by string key elsewhere. `version` names the layout; a record of another version is refused,
so a file written by newer code is never half-read. Files written before records had a version (the same keys,
flat) are read as version 1.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from fastlightgen.io_utils import atomic_write_text
from fastlightgen.plan import PrunePlan
from fastlightgen.sampling import Sampling

RUN_FILE = "run.json"
VERSION = 1
STAGES = ("stage2", "stage3")


@dataclass(frozen=True)
class StageRecord:
    stage: str  # "stage2" (the whole model, robust to the plan's skips) or "stage3" (the few-step student)
    plan: PrunePlan
    plan_path: str
    steps: int  # the optimizer steps the run took
    sampling: Sampling  # how its result is sampled: Stage III's few-step list, Stage II's teacher sampling
    data: dict  # the training data's fingerprint
    config: dict  # every setting of the run
    alpha: float | None = None  # Stage II's distillation weight (None for a Stage III started from the teacher)
    betas: tuple[float, float] | None = None  # Stage III's eq. 9 scales
    student_config: dict | None = None  # Stage III: the physically pruned student's diffusers config
    expert: str | None = None  # a two-expert model's expert this run trained ("high" or "low")
    sigma_range: tuple[float, float] | None = None  # and the part of the schedule it trained on
    version: int = VERSION

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"a stage record is of {' or '.join(STAGES)}, not {self.stage!r}")
        if self.stage == "stage3" and self.student_config is None:
            raise ValueError("a Stage III record needs the student's config")

    def provenance(self) -> dict:
        """What a checkpoint exported from this run says about how it was made."""
        return {"trainer": f"train.{self.stage}", "iterations": self.steps, "alpha": self.alpha,
                "betas": list(self.betas) if self.betas else [None, None], "data": self.data,
                "plan_method": self.plan.method, "keep_ratio": self.plan.keep_ratio}

    def to_dict(self) -> dict:
        return {"version": self.version, "stage": self.stage, "plan": self.plan.to_dict(), "plan_path": self.plan_path,
                "steps": self.steps, "sampling": asdict(self.sampling), "data": self.data, "config": self.config,
                "alpha": self.alpha, "betas": list(self.betas) if self.betas else None,
                "student_config": self.student_config, "expert": self.expert,
                "sigma_range": list(self.sigma_range) if self.sigma_range else None}

    @classmethod
    def from_dict(cls, d: dict) -> "StageRecord":
        version = d.get("version", 1 if "sampling" not in d else None)
        if version != VERSION:
            raise ValueError(f"a stage record of version {version}; this code reads version {VERSION}: read it with "
                             "the FastLightGen that wrote it, or run the stage again")
        sampling = Sampling.from_dict(d["sampling"]) if "sampling" in d else _unversioned_sampling(d)
        betas = d.get("betas") or ([d["beta1"], d["beta2"]] if d.get("beta1") is not None else None)
        sigma_range = d.get("sigma_range")
        return cls(d["stage"], PrunePlan.from_dict(d["plan"]), d["plan_path"], int(d["steps"]), sampling, d["data"],
                   d["config"], d.get("alpha"), tuple(betas) if betas else None, d.get("student_config"),
                   d.get("expert"), tuple(sigma_range) if sigma_range else None)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / RUN_FILE
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, folder: Path) -> "StageRecord":
        path = Path(folder) / RUN_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{folder} holds no {RUN_FILE}: that stage has not finished")
        return cls.from_dict(json.loads(path.read_text()))


def _unversioned_sampling(d: dict) -> Sampling:
    """The sampling of a record written before versions: Stage III's list and shift were flat keys."""
    return Sampling.few_step(d["denoising_step_list"], d["shift"]) if d["stage"] == "stage3" else Sampling()
