"""Models of a run: the teacher from its file, a stage's consolidated weights, the plan, the finished student.

A stage ends by writing `model.safetensors` (the whole model, diffusers layout) and `run.json` (stage,
plan, config, steps, data fingerprint) into its folder; the next stage, `train.export` and
`research.reproduce` read them. `teacher_config` reads the teacher's architecture without its weights
(`--dry-run`, the Stage II export).
"""
from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fastlightgen.diffusers_folder import BOUNDARY_KEY, EXPERT_PARTS, PIPELINE_CONFIG, ExpertPaths, folder_tensors
from fastlightgen.experts import EXPERTS, I2V_BOUNDARY, T2V_BOUNDARY, check_boundary
from fastlightgen.io_utils import atomic_path
from fastlightgen.plan import PrunePlan, read_plan
from fastlightgen.stored import StoredTensor, stored_tensors

from ..config import Config
from .record import StageRecord

MODEL_FILE = "model.safetensors"


def model_class(family: str) -> type[nn.Module]:
    from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

    return {"wan": WanTransformer3DModel, "hunyuanvideo": HunyuanVideoTransformer3DModel}[family]


# each part of a model folder and the setting that overrides it
PART_SETTINGS = {"transformer": "model.teacher", "transformer_2": "model.teacher_2", "vae": "preprocess.vae",
                 "text_encoder": "preprocess.text_encoder",
                 "tokenizer": "preprocess.tokenizer", "text_encoder_2": "preprocess.text_encoder_2",
                 "tokenizer_2": "preprocess.tokenizer_2"}  # HunyuanVideo's CLIP; transformer_2: A14B's low-noise expert
MODEL_LAYOUT = "model_index.json, transformer/, vae/, text_encoder/, tokenizer/"


def model_part(cfg: Config, part: str) -> Path:
    """Where `part` of the model is: its override setting (PART_SETTINGS), else model.path/<part>. Only paths are
    checked here, nothing is read, so a bad setting is named before any model loads."""
    setting = PART_SETTINGS[part]
    section, key = setting.split(".")
    override = getattr(getattr(cfg, section), key)
    if override:
        if not Path(override).exists():
            raise FileNotFoundError(f"{setting} {override!r} does not exist; fix the path, or clear it to use "
                                    f"model.path/{part}")
        return Path(override)
    if not cfg.model.path:
        raise FileNotFoundError(f"no {part}: set model.path to the model's folder as downloaded ({MODEL_LAYOUT}) "
                                f"or {setting} to the {part} alone")
    root = Path(cfg.model.path)
    if not (root / PIPELINE_CONFIG).is_file():
        raise FileNotFoundError(f"model.path {root} holds no model_index.json: point it at the model's root folder, "
                                f"the one holding {MODEL_LAYOUT}")
    if not (root / part).is_dir():
        raise FileNotFoundError(f"model.path {root} has no {part}/ subfolder: download the whole model folder, "
                                f"or set {setting} to where the {part} is")
    return root / part


def teacher_path(cfg: Config) -> Path:
    return model_part(cfg, "transformer")


def pipeline_config(cfg: Config) -> dict:
    """model.path's model_index.json (the pipeline's config), {} without one."""
    index = Path(cfg.model.path) / PIPELINE_CONFIG if cfg.model.path else None
    return json.loads(index.read_text()) if index is not None and index.is_file() else {}


def expert_count(cfg: Config) -> int:
    """2 for a two-expert model (model.teacher_2 or model.boundary set, or a folder holding transformer_2), else 1.
    Reads no weights: --dry-run's answer too."""
    in_folder = pipeline_config(cfg).get(EXPERT_PARTS["low"]) not in (None, [None, None])
    return 2 if cfg.model.teacher_2 or cfg.model.boundary or in_folder else 1


def model_experts(cfg: Config) -> ExpertPaths | None:
    """The experts of a two-expert model, None for one expert; every part named with its setting and fix before
    anything loads."""
    if expert_count(cfg) == 1:
        return None
    high, low = (model_part(cfg, EXPERT_PARTS[expert]) for expert in EXPERTS)
    boundary = cfg.model.boundary or pipeline_config(cfg).get(BOUNDARY_KEY)
    if not boundary:
        raise ValueError(f"a two-expert model needs the boundary between its experts, and "
                         f"{cfg.model.path or 'model.path'}/model_index.json names no boundary_ratio: set "
                         f"model.boundary (Wan2.2-T2V-A14B {T2V_BOUNDARY}, I2V-A14B {I2V_BOUNDARY})")
    return ExpertPaths(high, low, check_boundary(float(boundary)))


def stage_expert(cfg: Config, stage: str) -> str | None:
    """The expert `stage` works on (Stage II: stage2.expert), None on a one-expert model; a setting that does not
    fit the model is named with its fix."""
    two = model_experts(cfg) is not None
    expert = cfg.stage2.expert if stage == "stage2" else None
    if stage == "stage2" and two != bool(expert):
        raise ValueError(f"model {cfg.model.path or cfg.model.teacher} has two experts: set stage2.expert to "
                         f"{' or '.join(EXPERTS)} (Stage II trains one per run)" if two else
                         f"stage2.expert={expert} needs a two-expert model (model.path holding transformer_2/, or "
                         f"model.teacher_2); clear it for this one-expert model")
    if stage == "stage3" and two and Path(cfg.stage3.init).is_file():
        raise ValueError(f"stage3.init={cfg.stage3.init} is one Stage II run's file, but a two-expert model starts each "
                         "expert from its own: set stage3.init to the run folder holding stage2_high/ and stage2_low/ "
                         "(empty: this run's run_dir), or to teacher")
    return expert


def check_expert_plan(cfg: Config, configured: str, expert: str, boundary: float) -> None:
    """The plan at `configured` holds `expert`'s plan, scored at the model's boundary (read before any load)."""
    path = plan_path(cfg, configured)
    read_plan(path, expert)
    scored = json.loads(path.read_text())["boundary"]
    if scored != boundary:
        raise ValueError(f"the plan {path} was scored with the experts' boundary at {scored}, but the model's is "
                         f"{boundary}: run Stage I again, or set model.boundary={scored}")


def expert_config(cfg: Config, expert: str) -> Config:
    """`cfg` seen as the one-expert model `expert`: model.teacher is that expert's weights and the rest of the
    model folder is left unread, so every loader and the run's identity work on that expert alone."""
    experts = model_experts(cfg)
    model = replace(cfg.model, path="", teacher=str(experts.path(expert)), teacher_2="", boundary=0.0)
    return replace(cfg, model=model)


def load_teacher(cfg: Config) -> nn.Module:
    """The teacher (model.teacher, else model.path/transformer), in fp32 train mode (DeepSpeed casts for bf16)."""
    path = teacher_path(cfg)
    if cfg.model.family == "wan" and not path.is_dir():
        from fastlightgen.checkpoint import load_wan
        model, _ = load_wan(path)
    else:
        model = model_class(cfg.model.family).from_pretrained(str(path))
    return model.float().train()


def sharded(cfg: Config) -> bool:
    """Whether a stage's models load as this rank's ZeRO-3 partitions (ZeRO stage 3, dist.sharded_load) rather than
    whole on every rank before DeepSpeed partitions them."""
    return cfg.dist.deepspeed and cfg.dist.zero_stage == 3 and cfg.dist.sharded_load


def load_start(cfg: Config, init: str | Path | None) -> nn.Module:
    """The teacher's architecture holding the weights a stage starts from: `init` (another stage's
    model.safetensors), else the teacher's; in train mode. Whole in fp32 (DeepSpeed casts for bf16), or with
    `sharded(cfg)` only this rank's partitions in DeepSpeed's training dtype, read from the files one parameter
    at a time."""
    if sharded(cfg):
        from .units import partitioned_model

        return partitioned_model(cfg, model_class(cfg.model.family), teacher_config(cfg), start_tensors(cfg, init))
    return load_weights(load_teacher(cfg), init) if init else load_teacher(cfg)


def load_pruned(cfg: Config, model: nn.Module, init: str | Path | None, kept: list[int]) -> nn.Module:
    """The physically pruned copy of `model` (a `load_start(cfg, init)`): its `kept` blocks, renumbered. Whole, or
    with `sharded(cfg)` only this rank's partitions, read from the files `model` was read from."""
    from fastlightgen.adapters import adapt

    adapter = adapt(model)
    if not sharded(cfg):
        return adapter.pruned_model(kept)
    from .units import partitioned_model

    tensors = start_tensors(cfg, init)
    return partitioned_model(cfg, type(model), adapter.pruned_config(kept),
                             {new: tensors[old] for new, old in adapter.pruned_keys(kept).items()})


def start_tensors(cfg: Config, init: str | Path | None) -> dict[str, StoredTensor]:
    """The weights of `load_start(cfg, init)` by parameter name, located in their files but not read."""
    if init is None:
        return teacher_tensors(cfg)
    return stored_tensors(stage_file(init))


def teacher_tensors(cfg: Config) -> dict[str, StoredTensor]:
    """The teacher's weights by diffusers name, as `load_teacher` reads them, located but not read: a diffusers
    folder's safetensors files, or a Wan file of any layout and format (fastlightgen.checkpoint)."""
    path = teacher_path(cfg)
    if path.is_dir():
        try:
            return folder_tensors(path)
        except FileNotFoundError as err:  # ZeRO-3's sharded loading reads safetensors; from_pretrained reads others
            raise FileNotFoundError(f"teacher: {err}, or set dist.sharded_load=false") from None
    from fastlightgen.checkpoint import checkpoint_tensors

    return checkpoint_tensors(wan_file(cfg, path))


def wan_file(cfg: Config, path: Path) -> Path:
    """A teacher given as one file, which only a Wan teacher may be (fastlightgen.checkpoint reads it)."""
    if cfg.model.family != "wan":
        raise ValueError(f"teacher {path}: a {cfg.model.family} teacher is a diffusers folder, not a file")
    return path


def teacher_config(cfg: Config) -> dict:
    """The teacher's diffusers config from its folder's config.json or its file's safetensors header (shapes
    and FastLightGen metadata): the architecture `load_teacher` would build, without reading a weight."""
    path = teacher_path(cfg)
    if path.is_dir():
        return model_class(cfg.model.family).load_config(str(path))
    from fastlightgen.checkpoint import header_config

    return header_config(path, _safetensors_header(wan_file(cfg, path)))


def _safetensors_header(path: Path) -> dict:
    """Tensor names, dtypes, shapes and `__metadata__` of a safetensors file, read from its first bytes only
    (the tensor data may be absent)."""
    with path.open("rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
        raw = f.read(length) if 0 < length <= 100_000_000 else b""
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{path}: not a safetensors file (no JSON header)") from None


def stage_file(path: str | Path) -> Path:
    """An earlier stage's `model.safetensors`, which must exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the previous stage first or set its path")
    return path


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a stage's `model.safetensors` (must match the model exactly)."""
    path = stage_file(path)
    weights = load_file(str(path))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def student_model(cfg: Config, folder: Path, record: StageRecord) -> nn.Module:
    """The physically pruned model of a finished Stage II or III run (`record`: its StageRecord), in fp32."""
    from fastlightgen.adapters import adapt

    cls = model_class(cfg.model.family)
    if record.stage == "stage3":
        return load_weights(cls.from_config(record.student_config), folder / MODEL_FILE)
    model = load_weights(cls.from_config(teacher_config(cfg)), folder / MODEL_FILE)
    return adapt(model).pruned_model(record.plan.kept)


def save_stage_output(folder: Path, weights: dict[str, torch.Tensor], record: StageRecord) -> Path:
    out = folder / MODEL_FILE
    with atomic_path(out) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    record.save(folder)
    return out


def plan_path(cfg: Config, configured: str) -> Path:
    return Path(configured) if configured else cfg.stage_dir("stage1") / "plan.json"


def stage_inputs(cfg: Config, stage: str) -> dict[str, tuple[Path, str]]:
    """The earlier stages' outputs `stage` reads, by the setting naming each (defaults resolved), with how to
    make one that is missing."""
    if stage == "toy_teacher":
        return {"toy_teacher.init": (Path(cfg.toy_teacher.init), "give a toy teacher file (`toy_teacher.out` of an "
                                     "earlier run), or leave toy_teacher.init empty to train from scratch")
                } if cfg.toy_teacher.init else {}
    if stage not in ("stage2", "stage3"):
        return {}
    found = {f"{stage}.plan": (plan_path(cfg, getattr(cfg, stage).plan),
                               f"run `python -m train.stage1` first, or set {stage}.plan to a Stage I plan.json")}
    if stage == "stage2" and cfg.stage2.init:
        found["stage2.init"] = (Path(cfg.stage2.init), f"give a finished Stage II run's {MODEL_FILE}, or leave "
                                                       "stage2.init empty to start from the teacher")
    if stage == "stage3" and cfg.stage3.init != "teacher":
        if expert_count(cfg) == 1:
            found["stage3.init"] = (stage3_start(cfg, None), f"run `python -m train.stage2` first, or set stage3.init "
                                                             f"to a finished Stage II run's {MODEL_FILE} (or to `teacher`)")
        for expert in EXPERTS if expert_count(cfg) == 2 else ():
            found[f"stage3.init[{expert}]"] = (stage3_start(cfg, expert), f"run `python -m train.stage2 --set "
                                                                          f"stage2.expert={expert}` first")
    return found


def stage3_start(cfg: Config, expert: str | None) -> Path | None:
    """The Stage II weights Stage III starts from (None: the teacher's, stage3.init=teacher): stage3.init, else
    run_dir/stage2's; for one expert of two, that expert's Stage II run's in the folder stage3.init (a run_dir
    holding stage2_high/ and stage2_low/), else in run_dir."""
    if cfg.stage3.init == "teacher":
        return None
    if expert is None:
        return Path(cfg.stage3.init) if cfg.stage3.init else cfg.stage_dir("stage2") / MODEL_FILE
    runs = replace(cfg, stage2=replace(cfg.stage2, expert=expert),
                   run=replace(cfg.run, run_dir=cfg.stage3.init or cfg.run.run_dir))
    return runs.stage_dir("stage2") / MODEL_FILE


def check_stage_inputs(cfg: Config, stage: str) -> None:
    """Every file `stage` reads exists: checked before its run folder is made or any model loads."""
    if stage != "toy_teacher":  # the one trainer that reads no teacher
        teacher_path(cfg)  # names a missing teacher setting itself
        stage_expert(cfg, stage)  # and both experts' parts and boundary, for a two-expert model
        check_conditioning(cfg)
    if stage != "toy_teacher" and cfg.dist.sequence_parallel > 1:
        from ..distributed.sequence import check_setting

        check_setting(cfg, teacher_config(cfg))
    missing = [f"{setting} {path} does not exist: {fix}" for setting, (path, fix) in stage_inputs(cfg, stage).items()
               if not path.is_file()]
    if missing:
        raise FileNotFoundError("; ".join(missing))
    if stage != "toy_teacher" and cfg.data.source == "shards":  # every shard, and the model's widths
        from ..data.batches import ShardSet

        arch = teacher_config(cfg)
        ShardSet(cfg.data.shards).check_model(arch["out_channels"], arch.get("text_dim") or arch["text_embed_dim"])


def check_conditioning(cfg: Config) -> None:
    """An I2V teacher (fastlightgen.image_condition) trains on shards holding image latents, which train.preprocess
    writes for an I2V model. Reads the teacher's config and the shards' headers, no weights."""
    if cfg.model.family != "wan":
        return
    from fastlightgen.image_condition import condition_channels

    arch = teacher_config(cfg)
    if not condition_channels(arch["in_channels"], arch["out_channels"]):
        return
    if arch.get("image_dim"):
        raise ValueError(f"the teacher is a Wan 2.1 I2V model: it also takes CLIP image tokens (image_dim "
                         f"{arch['image_dim']}), which train.preprocess does not encode; of the I2V models only Wan 2.2 "
                         "I2V-A14B's experts (no image encoder) train")
    if cfg.data.source == "shards":
        from ..data.batches import ShardSet

        shards = ShardSet(cfg.data.shards)
        if "image_latents" in shards.shard(shards.items[0][0]):
            return
    data = f"the shards in {cfg.data.shards}" if cfg.data.source == "shards" else "the toy world's data"
    raise ValueError(f"the teacher is an I2V model ({arch['in_channels']} input channels: latents, mask and image "
                     f"latents, fastlightgen/image_condition.py), and {data} hold no image latents: run `python -m "
                     "train.preprocess` with this model's config (it encodes them for an I2V model) and train on "
                     "its shards")


def load_plan(cfg: Config, configured: str, model: nn.Module, expert: str | None = None) -> PrunePlan:
    """The Stage I plan at `configured` (default run_dir/stage1/plan.json): `expert`'s of a two-expert model."""
    from fastlightgen.adapters import adapt

    path = plan_path(cfg, configured)
    if not path.is_file():
        raise FileNotFoundError(f"prune plan {path} does not exist; run `python -m train.stage1` first")
    plan = read_plan(path, expert)
    plan.check(adapt(model).fingerprint())
    return plan
