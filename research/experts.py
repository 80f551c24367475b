"""`python -m research.experts`: the two-expert toy world of issue #41, against one expert at the same cost.

The two-expert teacher is the committed toy teacher split at sigma 0.875 (Wan2.2-T2V-A14B's boundary) into
models/fastlightgen/toy_teacher_{high,low}.safetensors (scripts/train_toy_experts.sh). Two arms are trained from
configs/toy.yaml's recipe, every stage cached under --root and resumable (a finished stage is reused, an
interrupted one continues from its newest checkpoint):
- two experts: Stage I per expert, Stage II of each expert on its part of the schedule (BUDGET.stage2 iterations
  each), Stage III of the pair, export (one file per expert); sampled through `ExpertPair`;
- one expert, the same training cost: from the committed one-expert teacher, Stage I, Stage II with as many
  iterations as the two experts' together, Stage III with the same iterations (a two-expert Stage III
  iteration updates one generator expert and one fake score: the one-expert iteration's cost), export.
Every model samples the held-out prompts of PROMPT_SEEDS[mode] x NOISE_SEEDS in both modes (the teacher pair 50-step
Euler with its CFG, the students their 4 steps), each batch of videos cached by the model files' digest
(research/draws.py), scored by fastlightgen/toy/evaluate.py and paired per video (95% bootstrap over the held-out
combinations, then videos; research/stats.py). The design (budget, prompt and noise seeds, the margin
research/stats.EQUIVALENCE_MARGIN) is fixed here before any run; the held-out videos choose nothing. A mode is
evidence only where the two-expert teacher's sanity ordering holds (T2V; TI2V fails it, as the one-expert
teacher's does: reports/toy/readings_2026-12-05.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from fastlightgen.experts import EXPERTS, T2V_BOUNDARY, ExpertPair
from fastlightgen.io_utils import atomic_write_text
from fastlightgen.sampling import Sampling
from fastlightgen.toy.generate import generate_few_step, generate_teacher
from train import export, stage1, stage2, stage3
from train.config import Config, load_config
from train.data.fingerprint import file_digest
from train.loop.identity import identity_hash, run_identity
from train.models.record import RUN_FILE, StageRecord

from .demo import MODELS_DIR, MODES, TEACHER, Candidate, load_fp32
from .draws import ROW_COLUMNS, Scored, difference, sanity_section, score
from .run_cache import StageCache
from .stats import EQUIVALENCE_MARGIN

CONFIG = "configs/toy.yaml"
EXPERT_TEACHERS = {e: MODELS_DIR / f"toy_teacher_{e}.safetensors" for e in EXPERTS}
BOUNDARY = T2V_BOUNDARY
# prompt draws per mode: TI2V, which is not evidence (its sanity ordering fails), on one draw only, to save the
# teacher pair's 50-step sampling for T2V (decided before any video was scored)
PROMPT_SEEDS = {"T2V": (0, 1), "TI2V": (0,)}
NOISE_SEEDS = (0, 1, 2, 3, 4)
ROOT = Path("runs/experts")
VIDEO_CACHE = Path("runs/draws")  # research.draws' cache: the committed teacher's videos are made once for both


@dataclass(frozen=True)
class Budget:
    """Training iterations per arm: each expert's Stage II and the pair's Stage III; the one-expert arm takes
    twice stage2 in its Stage II and as many Stage III iterations. Below toy.yaml's 2400 Stage II iterations (what
    fits one session on 2 CPU threads), alike for both arms; Stage III 50, half toy.yaml's 100, for the same reason
    (set before any Stage III ran, when the shared machine ran the stages at about a quarter of their idle speed)."""
    stage2: int = 400
    stage3: int = 50

    def two_experts(self) -> list[str]:
        return [f"model.teacher={EXPERT_TEACHERS['high']}", f"model.teacher_2={EXPERT_TEACHERS['low']}",
                f"model.boundary={BOUNDARY}", f"stage2.iterations={self.stage2}", f"stage3.iterations={self.stage3}"]

    def one_expert(self) -> list[str]:
        return [f"stage2.iterations={2 * self.stage2}", f"stage3.iterations={self.stage3}"]


# ---- training ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Arm:
    """A trained arm: its exported student files (by expert; "" for one expert) and its timed stage runs."""
    students: dict[str, Path]
    runs: dict[str, Path]  # "Stage II high" etc. -> the run folder (its metrics.jsonl)


def one_expert_student(root: Path, settings: list[str], config: str = CONFIG) -> Arm:
    """The one-expert arm: its stages through the report's cache, then the export."""
    cache = StageCache(root / "one_expert", config, settings)
    folder = cache.stage3(cache.config())
    out = folder.parent / "student.safetensors"
    if not out.is_file():
        export.run(StageCache.config_with(cache.config(), {"export.run": str(folder), "export.out": str(out),
                                                           "run.run_dir": str(folder.parent)}))
    stage2_folder = Path(StageRecord.load(folder).config["stage3"]["init"]).parent
    return Arm({"": out}, {"Stage II": stage2_folder, "Stage III": folder})


def stages_key(cfg: Config, *stages: str) -> str:
    """Everything the runs of `stages` depend on: Stage I's identity (both experts' contents, the boundary, data,
    seed) and the later stages' settings."""
    identity = run_identity(cfg, "stage1", cfg.dist.world_size, whole_run=True)
    return identity_hash({**identity, **{stage: vars(getattr(cfg, stage)) for stage in stages}})


def two_expert_students(root: Path, settings: list[str], config: str = CONFIG) -> Arm:
    """The two-expert arm: each stage run unless its output exists, then one exported student per expert. Stage I
    and both experts' Stage II runs share a folder keyed by their settings (`stages_key`); Stage III runs in a
    folder of its own inside it, keyed by its settings too, starting from them (stage3.init), so another Stage III
    budget reuses Stages I and II."""
    cfg = load_config(config, settings)
    folder = root / f"two_experts-{stages_key(cfg, 'stage2')}"
    cfg = StageCache.config_with(cfg, {"run.run_dir": str(folder)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    if not (folder / "stage1" / "plan.json").is_file():
        stage1.run(cfg)
    for expert in EXPERTS:
        one = StageCache.config_with(cfg, {"stage2.expert": expert})
        if not (one.stage_dir("stage2") / RUN_FILE).is_file():
            stage2.run(one, resume=True)
    last = folder / f"stage3-{stages_key(cfg, 'stage2', 'stage3')}"
    cfg = StageCache.config_with(cfg, {"run.run_dir": str(last), "stage3.init": str(folder),
                                       "stage3.plan": str(folder / "stage1" / "plan.json"),
                                       "export.out": str(last / "student.safetensors")})
    if not all((last / "stage3" / e / RUN_FILE).is_file() for e in EXPERTS):
        stage3.run(cfg, resume=True)
    outs = {e: export.expert_out(last / "student.safetensors", e) for e in EXPERTS}
    if not all(p.is_file() for p in outs.values()):
        export.run(cfg)
    return Arm(outs, {**{f"Stage II {e}": folder / f"stage2_{e}" for e in EXPERTS}, "Stage III": last / "stage3"})


def logged_steps(folder: Path) -> tuple[int, float]:
    """(steps, minutes of steps) of a finished stage run, from its metrics log: the logged seconds per step times
    the steps (the log may hold every n-th step only)."""
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["s_per_step"] for r in records if "s_per_step" in r]
    return records[-1]["step"], sum(seconds) / len(seconds) * records[-1]["step"] / 60


# ---- the models as the report samples them ---------------------------------------------------------

@dataclass(frozen=True)
class Model:
    """A compared model: its candidate (name, sampler) and the key of its cached videos (its files' digests)."""
    candidate: Candidate
    digest: str


def digest_of(*files: Path) -> str:
    """One file's digest, or for a pair the digest of both (their videos are cached under it)."""
    digests = [file_digest(f) for f in files]
    return digests[0] if len(digests) == 1 else hashlib.sha256("+".join(digests).encode()).hexdigest()[:16]


def pair(files: dict[str, Path]):
    """(ExpertPair, the high expert's metadata) of two expert files; the boundary is the files'."""
    (high, meta), (low, low_meta) = (load_fp32(files[e]) for e in EXPERTS)
    if (meta.expert, low_meta.expert) != EXPERTS or meta.boundary != low_meta.boundary:
        raise ValueError(f"{files} are not a high- and a low-noise expert of one boundary")
    return ExpertPair(high, low, meta.boundary), meta


def teacher_pair(files: dict[str, Path]) -> Model:
    experts, meta = pair(files)
    sampling = Sampling(cfg_scale=meta.recommended.cfg_scale)
    return Model(Candidate(f"two-expert teacher (50-step Euler, CFG {sampling.cfg_scale:g})",
                           lambda batch, seed: generate_teacher(experts, batch, seed, sampling)),
                 digest_of(*files.values()))


def student_pair(files: dict[str, Path]) -> Model:
    experts, meta = pair(files)
    return Model(Candidate(f"two-expert student (4-step, {len(meta.kept_blocks)}/{meta.original_num_blocks} blocks "
                           "per expert)", lambda batch, seed: generate_few_step(experts, batch, seed, meta.recommended)),
                 digest_of(*files.values()))


def one_model(name: str, path: Path, few_step: bool) -> Model:
    adapter, meta = load_fp32(path)
    if few_step:
        return Model(Candidate(name, lambda batch, seed: generate_few_step(adapter, batch, seed, meta.recommended)),
                     digest_of(path))
    sampling = Sampling(cfg_scale=meta.recommended.cfg_scale)
    return Model(Candidate(name, lambda batch, seed: generate_teacher(adapter, batch, seed, sampling)),
                 digest_of(path))


# ---- the report ----------------------------------------------------------------------------------

# (a, b, what a - b answers): the comparisons of the report, by the keys of `models`
COMPARISONS = (("student2", "teacher2", "the two-expert student against its teacher"),
               ("student2", "student1", "two experts against one expert at the same training cost"),
               ("student1", "teacher2", "the one-expert student against the two-expert teacher"),
               ("teacher2", "teacher1", "the split itself: the teacher pair against the committed teacher"))


def comparison_table(scored: dict[str, Scored], names: dict[str, str], evidence: bool, mode: str) -> str:
    lines = [f"| comparison | a − b on `faithful` [95% CI] | paired videos | verdict (±{EQUIVALENCE_MARGIN}) |",
             "|---|---|---|---|"]
    for a, b, question in COMPARISONS:
        interval = difference(scored[a], scored[b], noise_seeds=NOISE_SEEDS)
        verdict = interval.verdict() if evidence else f"none ({mode} is not evidence; {interval.verdict()} if it were)"
        lines.append(f"| {question}: {names[a]} − {names[b]} | {interval} | {interval.n} | {verdict} |")
    return "\n".join(lines)


def means_table(scored: dict[str, Scored], names: dict[str, str]) -> str:
    lines = ["| model | " + " | ".join(ROW_COLUMNS) + " |", "|---" * (len(ROW_COLUMNS) + 1) + "|"]
    for key, s in scored.items():
        mean = s.table.mean()
        lines.append(f"| {names[key]} | " + " | ".join(f"{mean[c]:.3f}" for c in ROW_COLUMNS) + " |")
    return "\n".join(lines)


def mode_report(mode: str, models: dict[str, Model], cache: Path) -> tuple[str, dict]:
    """One mode's sanity (on the two-expert teacher), means and comparisons; and its numbers."""
    scored = {k: score(m.candidate, m.digest, cache, mode, PROMPT_SEEDS[mode], NOISE_SEEDS) for k, m in models.items()}
    names = {k: m.candidate.name for k, m in models.items()}
    sanity, evidence = sanity_section(mode, scored["teacher2"], PROMPT_SEEDS[mode])
    text = (f"## {mode}\n\n### Sanity (the two-expert teacher)\n\n{sanity}\n### Means over the videos\n\n"
            f"{means_table(scored, names)}\n\n### Paired differences\n\n"
            f"{comparison_table(scored, names, evidence, mode)}\n")
    numbers = {"evidence": evidence, **{f"{a} - {b}": vars(difference(scored[a], scored[b], noise_seeds=NOISE_SEEDS))
                                        for a, b, _ in COMPARISONS}}
    return text, numbers


def training_table(arms: dict[str, Arm]) -> str:
    lines = ["| arm | stage run | iterations | minutes of steps |", "|---|---|---|---|"]
    for name, arm in arms.items():
        for stage, folder in arm.runs.items():
            steps, minutes = logged_steps(folder)
            lines.append(f"| {name} | {stage} | {steps} | {minutes:.1f} |")
    return "\n".join(lines)


def header(budget: Budget, arms: dict[str, Arm], models: dict[str, Model]) -> str:
    draws = " and ".join(f"{', '.join(map(str, seeds))} in {mode} ({len(seeds) * len(NOISE_SEEDS) * 12} videos)"
                         for mode, seeds in PROMPT_SEEDS.items())
    return (f"# Two experts in the toy world (issue #41), {date.today().isoformat()}\n\n"
            f"`python -m research.experts` (method and design: its docstring). Budget (fixed before the run, alike "
            f"for both arms): Stage II {budget.stage2} iterations per expert, {2 * budget.stage2} for the one "
            f"expert; Stage III {budget.stage3} iterations each; the rest of configs/toy.yaml's recipe as it is "
            f"(its 2400 Stage II iterations do not fit one session here). Models: "
            f"{'; '.join(m.candidate.name for m in models.values())}. Paired videos per model: the 12 held-out "
            f"combinations x noise seeds {', '.join(map(str, NOISE_SEEDS))}, drawn at prompt seeds {draws}; "
            f"intervals 95% bootstrap over the combinations, then videos; margin ±{EQUIVALENCE_MARGIN} (research/stats.py).\n\n## Training\n\n{training_table(arms)}\n\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="the arms' cached stage runs")
    p.add_argument("--cache", type=Path, default=VIDEO_CACHE, help="the cached videos (research.draws')")
    p.add_argument("--train-only", action="store_true", help="train and export the arms, sample nothing")
    p.add_argument("--out", type=Path, default=Path(f"reports/toy/experts_{date.today().isoformat()}.md"))
    args = p.parse_args(argv)
    budget = Budget()
    arms = {"two experts": two_expert_students(args.root, budget.two_experts()),
            "one expert": one_expert_student(args.root, budget.one_expert())}
    if args.train_only:
        return
    models = {"teacher2": teacher_pair(EXPERT_TEACHERS), "student2": student_pair(arms["two experts"].students),
              "student1": one_model("one-expert student (4-step, same training cost)",
                                    arms["one expert"].students[""], few_step=True),
              "teacher1": one_model("committed one-expert teacher (50-step Euler, CFG)", TEACHER, few_step=False)}
    modes = tuple(reversed(MODES))  # T2V, the evidence, first
    sections, numbers = zip(*(mode_report(mode, models, args.cache) for mode in modes))
    text = header(budget, arms, models) + "\n".join(sections)
    atomic_write_text(args.out, text)
    atomic_write_text(args.out.with_suffix(".json"), json.dumps(dict(zip(modes, numbers)), indent=1))
    print(text)


if __name__ == "__main__":
    main()
