"""Stage runs cached by the hash of the settings they depend on, so a report re-trains only what changed.

A stage's key hashes the model (its config and the teacher's content: a teacher retrained in place must not
reuse runs of the old one), data and seed, its own config section and the paths of its inputs, which name
the upstream runs by their keys: two variants that differ only in stage3.beta2 share their Stage I
and Stage II runs. Each run lives in `<root>/<stage>-<key>/` and is done when its final output exists
(plan.json for Stage I, run.json for Stages II and III); an interrupted run resumes from its newest
checkpoint. The runs are the ordinary entry points (`train.stage1|2|3`) called with a written config.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from fastlightgen.adapters import adapt
from fastlightgen.plan import PrunePlan
from train.config import Config, config_from_dict, load_config
from train.models import MODEL_FILE, RUN_FILE, load_teacher


def teacher_digest(path: str) -> str:
    """A file by its content; a folder (diffusers, many GB) by its files' names, sizes and modification times."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return _file_digest(str(p.resolve()), st.st_size, st.st_mtime_ns)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else ():
        st = f.stat()
        h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """Cached per (size, mtime) so a multi-GB teacher is read once per process, and a rewrite is noticed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def stage_key(cfg: Config, stage: str) -> str:
    what = {"model": asdict(cfg.model), "teacher": teacher_digest(cfg.model.teacher), "data": asdict(cfg.data),
            "seed": cfg.run.seed, "warmup": cfg.run.warmup, stage: asdict(getattr(cfg, stage))}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


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
                from . import stage1
                self._run(stage1, cfg, folder, {"stage1.plan": str(out)})
        return out

    def stage2(self, cfg: Config) -> Path:
        """The Stage II run folder (model.safetensors, run.json) for cfg, after its plan."""
        cfg = self.config_with(cfg, {"stage2.plan": str(self.plan(cfg))})
        folder = self.root / f"stage2-{stage_key(cfg, 'stage2')}"
        if not (folder / "stage2" / RUN_FILE).is_file():
            from . import stage2
            self._run(stage2, cfg, folder, {})
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
            from . import stage3
            self._run(stage3, cfg, folder, {})
        self.used.add(folder / "stage3")
        return folder / "stage3"

    @staticmethod
    def config_with(cfg: Config, settings: dict[str, str]) -> Config:
        data = cfg.to_dict()
        for dotted, value in settings.items():
            section, key = dotted.split(".")
            data[section][key] = value
        return config_from_dict(data)

    def _run(self, module, cfg: Config, folder: Path, settings: dict[str, str]) -> None:
        cfg = self.config_with(cfg, {**settings, "run.run_dir": str(folder)})
        folder.mkdir(parents=True, exist_ok=True)
        config_file = folder / "config.json"
        config_file.write_text(json.dumps(cfg.to_dict(), indent=1))
        print(f"[reproduce] training {folder.name}", flush=True)
        module.main(["--config", str(config_file), "--resume"])
        self.trained.append(folder.name)
