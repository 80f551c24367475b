"""Stage runs cached by the hash of the settings they depend on, so a report re-trains only what changed.

A stage's key hashes the run's identity (`run_identity` of the whole run: what changes its result, with
the contents of its input files, so a teacher retrained in place does not reuse runs of the old one; its
own config section holds the paths of its inputs, which name the upstream runs by their keys): two variants
that differ only in stage3.beta2 share their Stage I and Stage II runs. Each run lives in `<root>/<stage>-<key>/`
and is done when its final output exists (plan.json for Stage I, run.json for Stages II and III); an
interrupted run resumes from its newest checkpoint. The runs call the stages' API (`train.stage1|2|3.run`)
in-process with the Config, which is also written to the run's config.json for the reader.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from fastlightgen.adapters import adapt
from fastlightgen.plan import PrunePlan
from train import stage1, stage2, stage3
from train.config import Config, config_from_dict, load_config
from train.loop.identity import identity_hash, run_identity
from train.models.loading import MODEL_FILE, load_teacher
from train.models.record import RUN_FILE


def stage_key(cfg: Config, stage: str) -> str:
    return identity_hash(run_identity(cfg, stage, cfg.dist.world_size, whole_run=True))


@dataclass
class StageCache:
    root: Path
    config_file: str
    overrides: Sequence[str] = ()
    trained: list[str] = field(default_factory=list)  # runs this process trained (the rest were cached)
    used: set[Path] = field(default_factory=set)  # the Stage II and III run folders asked for, trained or cached

    def config(self, overrides: Sequence[str] = ()) -> Config:
        return load_config(self.config_file, [*self.overrides, *overrides])

    def plan(self, cfg: Config) -> Path:
        """Stage I's plan for cfg.stage1 (keep_ratio 1 keeps every block and needs no scoring)."""
        folder = self.root / f"stage1-{stage_key(cfg, 'stage1')}"
        out = folder / "plan.json"
        if not out.is_file():
            if cfg.stage1.keep_ratio >= 1:
                folder.mkdir(parents=True, exist_ok=True)
                model = load_teacher(cfg)
                PrunePlan.from_blocks(adapt(model).fingerprint(), []).save(out)
            else:
                self._run(stage1.run, cfg, folder, {"stage1.plan": str(out)})
        return out

    def stage2(self, cfg: Config) -> Path:
        """The Stage II run folder (model.safetensors, run.json) for cfg, after its plan."""
        cfg = self.config_with(cfg, {"stage2.plan": str(self.plan(cfg))})
        folder = self.root / f"stage2-{stage_key(cfg, 'stage2')}"
        if not (folder / "stage2" / RUN_FILE).is_file():
            self._run(functools.partial(stage2.run, resume=True), cfg, folder, {})
        self.used.add(folder / "stage2")
        return folder / "stage2"

    def stage3(self, cfg: Config) -> Path:
        """The Stage III run folder for cfg, after its plan and (unless stage3.init=teacher) its Stage II run."""
        paths = {"stage3.plan": str(self.plan(cfg))}
        if cfg.stage3.init != "teacher":
            paths["stage3.init"] = str(self.stage2(cfg) / MODEL_FILE)
        cfg = self.config_with(cfg, paths)
        folder = self.root / f"stage3-{stage_key(cfg, 'stage3')}"
        if not (folder / "stage3" / RUN_FILE).is_file():
            self._run(functools.partial(stage3.run, resume=True), cfg, folder, {})
        self.used.add(folder / "stage3")
        return folder / "stage3"

    @staticmethod
    def config_with(cfg: Config, settings: dict[str, str]) -> Config:
        data = cfg.to_dict()
        for dotted, value in settings.items():
            section, key = dotted.split(".")
            data[section][key] = value
        return config_from_dict(data)

    def _run(self, run: Callable[[Config], object], cfg: Config, folder: Path, settings: dict[str, str]) -> None:
        """`run` resumes an interrupted run of this folder (Stages II and III; Stage I has no checkpoints)."""
        cfg = self.config_with(cfg, {**settings, "run.run_dir": str(folder)})
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        print(f"[reproduce] training {folder.name}", flush=True)
        run(cfg)
        self.trained.append(folder.name)
