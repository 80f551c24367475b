"""Every training setting in one place: dataclass sections, a YAML/JSON file, `--set section.key=value`.

A run is described by one `Config`. Entry points read the sections they use; the shipped files in
`configs/` fill them for Wan 2.1 T2V 1.3B, Wan 2.2 TI2V 5B, HunyuanVideo and the toy world. Values given
with `--set` are parsed as YAML scalars/lists (`--set stage3.lr=1e-6`, `--set stage1.protected=[0,1]`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fastlightgen.experts import EXPERTS
from fastlightgen.flow import SIGMA_LAWS
from fastlightgen.fp8 import FP8_SCALED
from fastlightgen.sampling import FEW_STEP_LIST, FEW_STEP_SHIFT

from .ranges import problems


class ConfigError(ValueError):
    """A setting that is unknown, of the wrong type or out of its range; the message names it, its valid values
    and a fix. The command line turns it into a usage error (exit status 2), before anything loads."""


def one_of(*options: str) -> Any:
    """A string setting limited to `options` (the first is the default), checked when the config is read."""
    return field(default=options[0], metadata={"choices": options})


def added_setting(default: Any, choices: tuple[str, ...] = ()) -> Any:
    """A setting added after runs were cached (research.run_cache keys runs by `run_identity`): at its default it
    is left out of the identity, so every earlier run keeps its key; set, it counts like any other."""
    value = {"default_factory": lambda: type(default)(default)} if isinstance(default, (dict, list)) \
        else {"default": default}
    return field(metadata={"identity": "unless_default", **({"choices": choices} if choices else {})}, **value)


def export_setting(**default: Any) -> Any:
    """A setting read only when the weights are exported, left out of `run_identity`: a resumed run may
    change it (another output path, other candidates to choose from)."""
    return field(metadata={"identity": False}, **default)


@dataclass
class ModelConfig:
    family: str = one_of("wan", "hunyuanvideo")
    # the model's folder as Hugging Face distributes it (diffusers layout: model_index.json, transformer/, vae/,
    # text_encoder/, tokenizer/); model.teacher and preprocess.vae / text_encoder / tokenizer override its parts
    path: str = ""
    teacher: str = ""  # safetensors file (FastLightGen / original / diffusers Wan layout) or a diffusers folder
    arch: dict = field(default_factory=dict)  # diffusers config, used by --dry-run when the teacher is absent
    ti2v: bool = True  # first latent frame given clean (sigma 0) and carries no loss
    gradient_checkpointing: bool = False
    # two experts (Wan 2.2 A14B): model.teacher / transformer/ is the high-noise expert, this the low-noise one
    # (a file or a diffusers folder); empty: model.path/transformer_2 when the folder has one
    teacher_2: str = added_setting("")
    # the sigma where the high-noise expert hands over to the low-noise one; 0: the pipeline's boundary_ratio in
    # model.path/model_index.json. Set, it also declares a two-expert model (as --dry-run needs without the folder)
    boundary: float = added_setting(0.0)


@dataclass
class DataConfig:
    source: str = one_of("toy", "shards")  # generated on the fly | train.preprocess output
    shards: str = ""
    batch_size: int = 1  # per process
    caption_dropout: float = 0.1  # keeps the unconditional prediction trained: eq. 9 uses vP(null)
    first_frame_dropout: float = 0.0  # share of TI2V batches trained as T2V (no first frame given)
    # toy T2V batches on every background, or on the plain one alone: the kind the T2V prompts are scored on
    toy_t2v_background: str = one_of("any", "plain")


@dataclass
class DistConfig:
    deepspeed: bool = False  # False: a plain torch loop (one process, no DeepSpeed needed)
    zero_stage: int = 3
    offload_optimizer: bool = True  # optimizer states and the AdamW step on the CPU
    cpu_adam: bool = True  # DeepSpeedCPUAdam (compiled once); False: torch AdamW (zero_force_ds_cpu_optimizer off)
    bf16: bool = False
    world_size: int = 1  # GPUs the run is planned for; --dry-run estimates memory for it
    # Ulysses: groups of this many ranks share each sample, each running 1/n of its video tokens
    # (train/distributed/sequence.py); must divide the processes, the attention heads and the video tokens
    sequence_parallel: int = 1
    # ZeRO-3: each rank builds the models under deepspeed.zero.Init and reads only its partitions from the files;
    # false: every rank first loads them whole in fp32 (4 bytes x teacher + student per process; same results)
    sharded_load: bool = True
    param_persistence_threshold: int = 100_000  # ZeRO-3 keeps smaller params whole on every rank
    prefetch_bucket_size: int = 50_000_000  # 0 disables prefetch (skip-sets change the module order)
    grad_clip: float = 1.0


@dataclass
class RunConfig:
    run_dir: str = "runs/toy"  # each stage writes to run_dir/<stage>
    seed: int = 0
    save_every: int = 100  # checkpoint every K steps (and at the end)
    keep_checkpoints: int = 2
    log_every: int = 1
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    warmup: int = 0  # linear learning-rate warm-up steps


@dataclass
class PreprocessConfig:
    # "toy": the toy world's codec and text encoder; else model.family's own encoders (train/data/encoders.py)
    encoder: str = one_of("toy", "wan", "hunyuanvideo")
    videos: str = ""  # folder of videos (any container PyAV reads); without `captions`, each with a same-name .txt
    captions: str = ""  # or: JSONL / CSV / JSON list of records naming a video and its caption (train/data/dataset.py)
    video_column: str = ""  # the records' video field; "": the first of file, path, video
    caption_column: str = ""  # the records' caption field; "": the first of caption, cap, text, prompt
    null_prompt: str = ""  # its encoding is the null conditioning of CFG, caption dropout and eq. 9
    out: str = "data/shards"
    vae: str = ""  # overrides model.path/vae (real models)
    text_encoder: str = ""  # overrides model.path/text_encoder
    tokenizer: str = ""  # overrides model.path/tokenizer
    text_encoder_2: str = ""  # HunyuanVideo's CLIP: overrides model.path/text_encoder_2
    tokenizer_2: str = ""  # overrides model.path/tokenizer_2
    frames: int = 6  # Wan: 4k+1
    height: int = 32  # every video is scaled to cover height x width and center-cropped
    width: int = 32
    frame_stride: int = 1  # every k-th source frame is used, or:
    fps: float = 0.0  # the source resampled to this rate (0: frame_stride decides)
    shard_size: int = 64  # consecutive inputs of a process per shard (the usable ones are stored)
    toy_samples: int = 256  # toy world: how many training videos to render when `videos` is empty


@dataclass
class Stage1Config:
    samples: int = 8
    timesteps: int = 4
    keep_ratio: float = 0.7
    # two experts: a keep ratio for each, e.g. {high: 0.6, low: 0.8}; empty: both keep stage1.keep_ratio
    expert_keep_ratios: dict = added_setting({})
    protected: list = field(default_factory=list)
    plan: str = ""  # output path; default run_dir/stage1/plan.json


@dataclass
class Stage2Config:
    plan: str = ""  # default run_dir/stage1/plan.json
    # the weights trained: empty, the teacher's; or a Stage II model.safetensors (all blocks) of the same
    # teacher, continued toward this run's plan (progressive pruning: a smaller plan from a larger one's run)
    init: str = ""
    lr: float = 1e-5
    iterations: int = 4000
    alpha: float = 1.0  # 1: distillation only (paper's best); < 1 adds flow matching on both paths
    # the distillation target vU: the weights being trained (the paper's form) | a frozen copy of the starting
    # weights | an EMA of the trained weights (plain loop only), decay target_ema_decay
    target: str = one_of("shared", "frozen", "ema")
    target_ema_decay: float = 0.99
    skip_prob: float = 0.5  # each dropped block skipped independently with this probability
    lr_decay: str = one_of("constant", "cosine")  # cosine: the learning rate falls to zero at `iterations`
    weight_decay: float = 0.0
    sigma_law: str = one_of(*SIGMA_LAWS)  # training sigmas (fastlightgen.flow), then
    sigma_shift: float = 1.0  # the shift warp
    # two experts: the one this run trains, on its part of the schedule only (fastlightgen.experts); a
    # two-expert model needs one, a one-expert model none
    expert: str = added_setting("", ("", *EXPERTS))


@dataclass
class Stage3Config:
    # Stage II weights; default run_dir/stage2/model.safetensors; "teacher": no Stage II. Two experts: the run folder
    # holding stage2_high/ and stage2_low/ (default run_dir)
    init: str = ""
    plan_teacher: str = one_of("pruned", "unpruned")  # real and fake score on the pruned path (eq. 9) or all blocks
    plan: str = ""  # default run_dir/stage1/plan.json
    lr: float = 5e-7  # generator
    fake_lr: float = 5e-7
    iterations: int = 1000
    beta1: float = 3.5
    beta2: float = 0.25
    beta1_below: float = 1.0
    beta1_above: float = 1.0
    beta2_jitter: float = 0.1
    fake_updates: int = 5  # TTUR: fake-score updates per generator update
    lora_rank: int = 16
    lora_alpha: float = 16.0
    denoising_step_list: list = field(default_factory=lambda: list(FEW_STEP_LIST))
    shift: float = FEW_STEP_SHIFT
    dmd_sigma_range: list = field(default_factory=lambda: [0.02, 0.98])  # before the shift warp


@dataclass
class ToyTeacherConfig:
    """`train.toy_teacher`: the toy world's teacher trained by flow matching, from scratch or from `init` (batch
    size, caption dropout, warm-up, seed and gradient clipping come from data, run and dist)."""
    # fields of fastlightgen.toy.teacher.ToyTeacherShape to change; empty: the shipped 12-block shape
    shape: dict = field(default_factory=dict)
    # a toy teacher file of this shape to continue training (a fine-tune with other data settings); empty: fresh
    # weights seeded by run.seed
    init: str = ""
    iterations: int = 1800
    lr: float = 3e-4
    lr_decay: str = one_of("constant", "cosine")  # cosine: the learning rate falls to zero at `iterations`
    # > 0: warm-up and decay restart every lr_cycle steps (cosine then falls to zero at each cycle's end), so a
    # finished run is continued by raising `iterations` by whole cycles (train.loop.run.learning_rate)
    lr_cycle: int = 0
    weight_decay: float = 0.0
    # uniform, then shift 5: the density of the sigmas the teacher's 50-step Euler sampler visits
    sigma_law: str = field(default="uniform", metadata={"choices": SIGMA_LAWS})
    sigma_shift: float = 5.0
    ema_decay: float = 0.999  # the EMA of the weights is the exported teacher
    # one expert of a two-expert toy teacher (fastlightgen.experts): training sigmas drawn only on its part of the
    # schedule, split at `boundary`; the file names both. Empty: the whole schedule (a one-expert teacher)
    expert: str = added_setting("", ("", *EXPERTS))
    boundary: float = added_setting(0.0)
    # CFG scales scored on training prompts at export; the best becomes the recommended one. All above 1:
    # the teacher is a CFG teacher, as in the paper (CFG 1 would halve every speed-up).
    cfg_candidates: list = export_setting(default_factory=lambda: [2.0, 3.5, 5.0])
    out: str = export_setting(default="")  # default run_dir/toy_teacher.safetensors


@dataclass
class ExportConfig:
    run: str = ""  # a stage run folder; default run_dir/stage3
    out: str = ""  # default run_dir/student.safetensors
    diffusers_out: str = ""  # also write a diffusers folder here
    # fp8_scaled: ComfyUI's fp8_scaled checkpoint (fastlightgen/fp8.py), about half the size of bfloat16; a
    # diffusers folder (diffusers_out) holds only the other three
    dtype: str = one_of("bfloat16", "float16", "float32", FP8_SCALED)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    toy_teacher: ToyTeacherConfig = field(default_factory=ToyTeacherConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def stage_dir(self, stage: str) -> Path:
        """run_dir/<stage>; a Stage II run of one expert of two: run_dir/stage2_<expert>, so both fit one run_dir."""
        if stage == "stage2" and self.stage2.expert:
            return Path(self.run.run_dir) / f"stage2_{self.stage2.expert}"
        return Path(self.run.run_dir) / stage

    def validate(self) -> Config:
        """Raises ConfigError naming every out-of-range setting (train/ranges.py); returns the config."""
        found = problems(self)
        if found:
            raise ConfigError("; ".join(found))
        return self


# ---- loading -------------------------------------------------------------------------------------

def _build(cls, values: dict | None, where: str):
    values = {} if values is None else values  # an empty YAML section
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the config'} must be a mapping of settings, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(where + k for k in unknown)}; "
                         f"valid in {where.rstrip('.') or 'the top level'}: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        kwargs[name] = _build(type(default), value, f"{where}{name}.") if dataclasses.is_dataclass(default) \
            else _coerce(value, default, where + name)
        choices = known[name].metadata.get("choices")
        if choices and kwargs[name] not in choices:
            raise ConfigError(f"{where}{name} must be one of {', '.join(choices)}, got {kwargs[name]!r}")
    return cls(**kwargs)


def _coerce(value: Any, default: Any, name: str) -> Any:
    if value is None and isinstance(default, str):  # `--set stage2.plan=` clears a path
        return ""
    if isinstance(default, bool) or default is None or isinstance(default, (list, dict)):
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-6" (no dot) as a string
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not isinstance(value, type(default)) or isinstance(value, bool):  # YAML's true is an int to Python
        raise ConfigError(f"{name} must be a {type(default).__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set takes section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip().split("."), yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key.strip()}: {raw!r} is not a YAML value ({err})") from None


def config_from_dict(data: dict) -> Config:
    return _build(Config, data, "").validate()


def load_config(path: str | None, overrides: list[str] = ()) -> Config:
    data: dict = {}
    if path:
        try:
            text = Path(path).read_text()
            data = (json.loads(text) if path.endswith(".json") else yaml.safe_load(text)) or {}
        except (OSError, ValueError, yaml.YAMLError) as err:
            raise ConfigError(f"config file {path}: {err}") from None
    for override in overrides:
        keys, value = parse_override(override)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return config_from_dict(data)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML or JSON config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set stage3.lr=1e-6 (repeatable)")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)
