"""`--dry-run`: per-GPU memory of a config under ZeRO-3 at its planned world size, without loading weights.

The architecture comes from model.arch, else from the teacher's config.json (a diffusers folder) or its
safetensors header (a file); the model is built once, on the meta device. ZeRO-3 splits parameters,
gradients and optimizer states evenly over the W ranks. Per GPU:
  parameters  (every model the stage holds) * bytes / W; Stage II's own target weights (stage2.target
              frozen) are partitioned the same way when loaded sharded (dist.sharded_load), else whole on
              every rank (* bytes), as the EMA target (plain loop) is
  gradients   (trainable parameters) * bytes / W
  optimizer   (trainable parameters) * 12 / W   (fp32 master copy + AdamW's two moments; on the CPU
              when dist.offload_optimizer is set, then counted in the host RAM below instead)
  gathered    the largest block, whole, twice (the one running and the one prefetched)
  activations B (data.batch_size) samples of T tokens, width D, FFN width F, at `bytes` (bf16: 2):
              T = latent frames / patch_t * latent height / patch_h * latent width / patch_w, the latent
              shape from preprocess.frames / height / width and the codec's strides (video_strides);
              a block input ("checkpoint")  = B * T * D * bytes, kept per block that runs with gradients
              (with model.gradient_checkpointing; without it a block keeps its full activations);
              one block's full activations = B * T * (13 D + 2 F) * bytes, the tensors autograd saves
              when the block is recomputed: self-attention 7 D (norm in/out, q, k, v, attention out,
              projection out), cross-attention 4 D (norm, q, attention out, projection out), FFN 2 D + 2 F
              (norm, hidden, activation, out). Attention is assumed fused (flash / SDPA): no T x T scores.
              The text tokens, the timestep embeddings and the latents themselves are left out (small).
              With sequence parallelism (dist.sequence_parallel = n; train/distributed/sequence.py) each GPU holds
              T / n of every sample's tokens; the text stream, which each GPU keeps whole, is left out as above.
  Per stage (n blocks, k kept by the plan):
    stage1  inference, no gradients: one block's full activations
    stage2  the pruned path with gradients keeps a checkpoint per block it runs (n at worst: nothing
            skipped); with stage2.alpha < 1 the unpruned path too, the two sharing the blocks before the
            first skipped one (2n - 1 at worst: they part at block 0); + one block's full activations
    stage3  the larger of the generator update (backward simulation without gradients, then the student's
            k checkpoints held while the teacher's guided pass runs three predictions batched: 3 blocks'
            full activations) and the fake-score update (a checkpoint per LoRA block + one block's full
            activations)
The plan is not known before Stage I: the student counts the largest blocks (an upper bound for uneven
blocks). Stage III holds the student (the kept blocks, trainable), the frozen teacher and the fake score's
LoRA, which sits on the kept blocks (on every block with stage3.plan_teacher=unpruned).
Two experts (Wan 2.2 A14B, train.models.loading.expert_count) of one architecture: Stage I scores them one after the
other and a Stage II run trains one (stage2.expert), so both hold one expert as above; Stage III holds both
experts' students, frozen teachers and fake-score LoRAs (every parameter term twice) and runs one expert's
activations at a time (train.stage3: a step or a draw goes to one expert).
Disk (checkpoint_gib): a DeepSpeed step_* checkpoint holds CHECKPOINT_BYTES per trained parameter (frozen weights
are rebuilt from the config, not written); model.safetensors the stage's model in the training dtype.
The verdict compares the largest stage's GPU total with 80 GB = 80e9 bytes (74.5 GiB; an H100 80GB shows
79.6 GiB, the rest is left for the CUDA context and the allocator's fragmentation).
Host RAM per node (DeepSpeed runs; GPUS_PER_NODE ranks, or W if fewer), per rank:
  PROCESS_GIB (the process itself: Python, torch, DeepSpeed, diffusers)
  + the larger of
    loading     with dist.sharded_load off only: 4 bytes * the models every rank loads whole in fp32 before
                DeepSpeed partitions them (the teacher; in Stage III the student too). Sharded loading
                (train/models/units.py, `partitioned_model`) keeps at most the largest module's initial values and
                a few rows of one stored tensor beyond the rank's partitions, which live on the GPU.
    training    20 bytes * trainable / W with the optimizer offloaded (OPTIMIZER_HOST_BYTES: fp32 master 4,
                AdamW moments 8, two fp32 gradient partitions 8)
On a CPU accelerator (DS_ACCELERATOR=cpu, as the tests and research.bench.host_memory run) the GPU's terms
are host RAM too, and `training` adds: the parameter partitions (bytes * every model / W), the parameters
DeepSpeed keeps gathered between reuses (bytes * each engine's model, at most MAX_LIVE_PARAMETERS each: in
Stage III the student stays gathered while the teacher's pass runs), each trained engine's gradient reduce
bucket (bytes * its trained parameters, at most REDUCE_BUCKET) plus the largest one's flattened copy while it is
reduce-scattered, and the activations. (On GPUs the gathered parameters and the buckets sit on the GPU, and
the GPU columns leave them out: they count two blocks gathered and no bucket.) Measured against this on the
CPU: reports/host_memory_2026-12-04.md.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fastlightgen.fp8 import FP8_SCALED

from ..config import Config
from .loading import expert_count, model_class, sharded, teacher_config

GIB = 1024 ** 3
LIMIT_GIB = 80e9 / GIB  # the paper's "< 80 GB per GPU" (H100 80GB)
GPUS_PER_NODE = 8  # the paper's nodes (8 x H100); the config names only the world size
# the full activations of one block per token, in units of (width, FFN width): see the module docstring
FULL_PER_TOKEN = (13, 2)
# host bytes per trained parameter and rank (/ W) with the optimizer offloaded: fp32 master copy 4, AdamW moments 8,
# and two fp32 gradient partitions 8 (the offloaded optimizer's and ZeRO-3's own, on the CPU with it)
OPTIMIZER_HOST_BYTES = 20
# bytes per trained parameter in a DeepSpeed step_* checkpoint: ZeRO-3's optimizer files hold the fp32 master weights
# and AdamW's two moments (12.04 measured on the tiny teacher; frozen weights are not written)
CHECKPOINT_BYTES = 12
# one process's own resident set: Python, torch, DeepSpeed and diffusers imported (0.79 GiB measured on the CPU,
# research.bench.host_memory); a GPU process adds CUDA's host-side runtime, not measured here
PROCESS_GIB = 0.8
# DeepSpeed's ZeRO-3 defaults, which train/models/units.py leaves as they are: parameters kept gathered between reuses
# (stage3_max_live_parameters) and the gradient reduce bucket (reduce_bucket_size), in elements
MAX_LIVE_PARAMETERS = 1e9
REDUCE_BUCKET = 5e8


@dataclass
class ParamCounts:
    total: int
    per_block: list[int]
    lora_per_block: list[int]  # the fake score's LoRA at stage3.lora_rank, were it on that block
    width: int = 0  # the blocks' hidden size (heads x head dim)
    ffn: int = 0  # the FFN's hidden size
    patch: tuple[int, int, int] = (1, 1, 1)  # (t, h, w)
    in_channels: int = 0
    heads: int = 1

    @property
    def outside_blocks(self) -> int:
        return self.total - sum(self.per_block)


def meta_model(cfg: Config) -> nn.Module:
    """The config's model on the meta device: no weight is read or allocated."""
    config = cfg.model.arch or teacher_config(cfg)
    with torch.device("meta"):
        return model_class(cfg.model.family).from_config(config)


def block_shape(config) -> dict:
    """width, ffn, patch (t, h, w) and in_channels from a Wan or HunyuanVideo diffusers config."""
    width = config["num_attention_heads"] * config["attention_head_dim"]
    ffn = config.get("ffn_dim") or int(config.get("mlp_ratio", 4.0) * width)
    patch = config["patch_size"]
    if isinstance(patch, (list, tuple)):  # Wan: (t, h, w)
        patch = tuple(int(x) for x in patch)
    else:  # HunyuanVideo: patch_size (spatial) and patch_size_t
        patch = (int(config.get("patch_size_t", 1)), int(patch), int(patch))
    return {"width": int(width), "ffn": int(ffn), "patch": patch, "in_channels": int(config["in_channels"]),
            "heads": int(config["num_attention_heads"])}


def count_params(cfg: Config) -> ParamCounts:
    from fastlightgen.adapters import adapt
    from fastlightgen.lora import add_lora

    model = meta_model(cfg)
    blocks = adapt(model).blocks()
    total = sum(p.numel() for p in model.parameters())
    per_block = [sum(p.numel() for p in b.parameters()) for b in blocks]
    # counted after the base parameters: the LoRA layers are added to this throwaway meta model
    lora = [sum(layer.lora_down.weight.numel() + layer.lora_up.weight.numel()
                for layer in add_lora([b], cfg.stage3.lora_rank, cfg.stage3.lora_alpha)) for b in blocks]
    return ParamCounts(total, per_block, lora, **block_shape(model.config))


def video_strides(cfg: Config, counts: ParamCounts) -> tuple[int, int]:
    """(temporal, spatial) compression of the codec the shards are encoded with."""
    if cfg.model.family == "hunyuanvideo":
        return 4, 8  # diffusers AutoencoderKLHunyuanVideo: temporal_compression_ratio 4, spatial 8 (3 downsamples)
    if cfg.preprocess.encoder == "toy":
        from fastlightgen.toy.codec import PATCH
        return 1, PATCH  # as train/preprocess.py's shape check: frames kept, PATCH x PATCH pixels per latent
    # diffusers AutoencoderKLWan: Wan 2.1's VAE (16 latent channels) 4 x 8, Wan 2.2's (48 channels) 4 x 16
    return 4, (16 if counts.in_channels == 48 else 8)


def tokens(cfg: Config, counts: ParamCounts) -> int:
    """Transformer tokens of one sample of the preprocess video shape."""
    temporal, spatial = video_strides(cfg, counts)
    p = cfg.preprocess
    pt, ph, pw = counts.patch
    return ((p.frames - 1) // temporal + 1) // pt * (p.height // spatial // ph) * (p.width // spatial // pw)


def stage3_blocks(cfg: Config, counts: ParamCounts) -> tuple[int, int]:
    """(the blocks the student keeps, the blocks carrying the fake score's LoRA)."""
    n = len(counts.per_block)
    kept = max(1, round(cfg.stage1.keep_ratio * n))
    return kept, kept if cfg.stage3.plan_teacher == "pruned" else n


def stage3_params(cfg: Config, counts: ParamCounts) -> tuple[int, int]:
    """(the student's parameters, the fake score's LoRA's). The plan is not known before Stage I: the largest blocks
    are counted (an upper bound for uneven blocks)."""
    kept, lora_blocks = stage3_blocks(cfg, counts)
    student = counts.outside_blocks + sum(sorted(counts.per_block)[-kept:])
    return student, sum(sorted(counts.lora_per_block)[-lora_blocks:])


def activations(cfg: Config, counts: ParamCounts) -> dict[str, float]:
    """Activation GiB per GPU of each stage (the module docstring has the formula and its assumptions)."""
    b = 2 if cfg.dist.bf16 else 4
    per_sample = tokens(cfg, counts) / cfg.dist.sequence_parallel * cfg.data.batch_size * b
    full = per_sample * (FULL_PER_TOKEN[0] * counts.width + FULL_PER_TOKEN[1] * counts.ffn)
    kept_block = per_sample * counts.width if cfg.model.gradient_checkpointing else full
    n = len(counts.per_block)
    kept, lora_blocks = stage3_blocks(cfg, counts)
    stage2_blocks = n if cfg.stage2.alpha >= 1.0 else 2 * n - 1
    stage3 = max(kept * kept_block + 3 * full, lora_blocks * kept_block + full)
    return {"stage1": full / GIB, "stage2": (stage2_blocks * kept_block + full) / GIB, "stage3": stage3 / GIB}


class Held(NamedTuple):
    """The parameters a training stage holds: every model's (`held`, ZeRO-3-partitioned), the trained ones'
    (`trainable`), the model of each DeepSpeed engine (`engines`) and the trained part of each (`trained`), a copy
    whole on every rank (`whole`), and with dist.sharded_load off what every rank loads whole in fp32 before
    DeepSpeed partitions it (`loaded`)."""
    held: int
    trainable: int
    engines: tuple[int, ...]
    trained: tuple[int, ...]
    whole: int = 0
    loaded: int = 0


def host_per_rank(cfg: Config, h: Held, b: int, w: int, activation_gib: float, on_cpu: bool) -> float:
    """Host RAM of one process in GiB, the module docstring's terms: the process itself, then the larger of the
    models loaded whole (dist.sharded_load off) and what training holds on the host."""
    training = OPTIMIZER_HOST_BYTES * h.trainable / w if cfg.dist.offload_optimizer or on_cpu else 0.0
    if on_cpu:  # what DeepSpeed keeps on the accelerator is in the host's RAM too
        buckets = [min(t, REDUCE_BUCKET) for t in h.trained if t]
        training += b * (h.held / w + h.whole + sum(min(e, MAX_LIVE_PARAMETERS) for e in h.engines)
                         + sum(buckets) + max(buckets, default=0)) + activation_gib * GIB
    return PROCESS_GIB + max(4 * h.loaded, training) / GIB


def estimate(cfg: Config, counts: ParamCounts | None = None, on_cpu: bool = False) -> dict[str, dict[str, float]]:
    """Per stage, GiB per GPU by term, `gpu_total` and `host_ram_per_node`; `on_cpu`: DeepSpeed runs on the CPU
    (DS_ACCELERATOR=cpu), so the host holds every term."""
    counts = counts or count_params(cfg)
    w = max(1, cfg.dist.world_size) if cfg.dist.deepspeed else 1
    offload = cfg.dist.deepspeed and cfg.dist.offload_optimizer
    per_node = min(w, GPUS_PER_NODE)
    b = 2 if cfg.dist.bf16 else 4
    student, lora = stage3_params(cfg, counts)
    gathered = 2 * max(counts.per_block) * b / GIB if cfg.dist.deepspeed else 0.0
    act = activations(cfg, counts)

    def stage(name: str, h: Held) -> dict[str, float]:
        row = {"parameters": h.held * b / w / GIB + h.whole * b / GIB, "gradients": h.trainable * b / w / GIB,
               "optimizer": h.trainable * 12 / w / GIB, "gathered": gathered, "activations": act[name]}
        on_gpu = ["parameters", "gradients", "gathered", "activations"] + ([] if offload else ["optimizer"])
        row["gpu_total"] = sum(row[k] for k in on_gpu)
        row["host_ram_per_node"] = host_per_rank(cfg, h, b, w, act[name], on_cpu) * per_node \
            if cfg.dist.deepspeed else 0.0
        return row

    stage1 = {"parameters": counts.total * b / GIB, "gradients": 0.0, "optimizer": 0.0, "gathered": 0.0,
              "activations": act["stage1"], "host_ram_per_node": 0.0}
    stage1["gpu_total"] = stage1["parameters"] + stage1["activations"]
    # stage2.target frozen or ema: a second copy of the weights, partitioned like them when loaded sharded
    target = counts.total if cfg.stage2.target != "shared" else 0
    if sharded(cfg):
        stage2 = Held(counts.total + target, counts.total, (counts.total, target), (counts.total,))
    else:
        stage2 = Held(counts.total, counts.total, (counts.total,), (counts.total,), whole=target, loaded=counts.total)
    pair = expert_count(cfg)  # Stage III holds every expert; Stages I and II one at a time
    stage3 = Held(pair * (counts.total + student + lora), pair * (student + lora),
                  (pair * student, pair * (counts.total + lora)), (pair * student, pair * lora),
                  loaded=0 if sharded(cfg) else pair * (counts.total + student))
    return {"stage1": stage1, "stage2": stage("stage2", stage2), "stage3": stage("stage3", stage3)}


def verdict(rows: dict[str, dict[str, float]]) -> str:
    peak = max(r["gpu_total"] for r in rows.values())
    return f"fits in 80 GB per GPU: {'yes' if peak < LIMIT_GIB else 'no'} (estimate {peak:.1f} GiB)"


def checkpoint_gib(cfg: Config, counts: ParamCounts) -> dict[str, float]:
    """GiB on disk: one DeepSpeed step_* checkpoint of Stages II and III (run.keep_checkpoints of them are kept, and
    one more while a save is staged), each stage's model.safetensors (Stage II's whole model, Stage III's student, in
    the training dtype) and the exported student (export.dtype)."""
    b = 2 if cfg.dist.bf16 else 4
    student, lora = stage3_params(cfg, counts)
    pair = expert_count(cfg)  # Stage II trains one expert per run; Stage III both
    # fp8_scaled: 1 byte a weight (about half of bfloat16 with its scales and the small tensors it keeps in bf16)
    export = 1 if cfg.export.dtype == FP8_SCALED else getattr(torch, cfg.export.dtype).itemsize
    return {"stage2_step": CHECKPOINT_BYTES * counts.total / GIB, "stage2_model": b * counts.total / GIB,
            "stage3_step": CHECKPOINT_BYTES * pair * (student + lora) / GIB, "stage3_model": b * pair * student / GIB,
            "export": export * pair * student / GIB}


def checkpoint_line(cfg: Config, counts: ParamCounts) -> str:
    c = checkpoint_gib(cfg, counts)
    keep = cfg.run.keep_checkpoints
    return (f"disk: a step_* checkpoint {c['stage2_step']:.1f} GiB (Stage II) / {c['stage3_step']:.1f} GiB (Stage III), "
            f"{keep} kept + 1 while saving; model.safetensors {c['stage2_model']:.1f} / {c['stage3_model']:.1f} GiB; "
            f"the exported student ({cfg.export.dtype}) {c['export']:.1f} GiB")


def sequence_parallel_sizes(cfg: Config, counts: ParamCounts) -> list[int]:
    """The sizes dist.sequence_parallel may take at the config's world size: divisors of it, of the heads and of
    one sample's tokens (train/distributed/sequence.py checks the same when a run starts)."""
    t = tokens(cfg, counts)
    return [n for n in range(1, max(1, cfg.dist.world_size) + 1)
            if cfg.dist.world_size % n == 0 and counts.heads % n == 0 and t % n == 0]


def smallest_fitting_sequence_parallel(cfg: Config, counts: ParamCounts) -> tuple[int, float] | None:
    """(the smallest sequence-parallel size whose largest stage fits 80 GB per GPU, that stage's GiB), or None."""
    for n in sequence_parallel_sizes(cfg, counts):
        trial = copy.deepcopy(cfg)
        trial.dist.sequence_parallel = n
        peak = max(r["gpu_total"] for r in estimate(trial, counts).values())
        if peak < LIMIT_GIB:
            return n, peak
    return None


def sequence_parallel_line(cfg: Config, counts: ParamCounts) -> str:
    if not cfg.dist.deepspeed:
        return "sequence parallelism: needs dist.deepspeed"
    found = smallest_fitting_sequence_parallel(cfg, counts)
    now = f"dist.sequence_parallel {cfg.dist.sequence_parallel}"
    if found is None:
        return (f"sequence parallelism ({now}): no size up to the world size {cfg.dist.world_size} fits 80 GB per GPU "
                f"(sizes allowed: {sequence_parallel_sizes(cfg, counts)})")
    n, peak = found
    return f"sequence parallelism ({now}): the smallest size that fits 80 GB per GPU is {n} (estimate {peak:.1f} GiB)"


def report(cfg: Config) -> str:
    counts = count_params(cfg)
    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu"
    rows = estimate(cfg, counts, on_cpu)
    d = cfg.dist
    offload = d.deepspeed and d.offload_optimizer
    where = "CPU (offloaded)" if offload else "GPU"
    setup = f"world size {d.world_size}, {'bf16' if d.bf16 else 'fp32'}, ZeRO-{d.zero_stage}" if d.deepspeed \
        else "one plain process (no DeepSpeed: nothing sharded), fp32"
    p = cfg.preprocess
    ckpt = "on" if cfg.model.gradient_checkpointing else "off"
    pair = expert_count(cfg)
    experts = "" if pair == 1 else (f" per expert, 2 experts (Stages I and II hold one at a time, Stage III "
                                    f"both: {2 * counts.total / 1e9:.3f} B)")
    head = (f"{cfg.model.family}: {counts.total / 1e9:.3f} B parameters in {len(counts.per_block)} blocks{experts}; "
            f"{setup}, optimizer states on {where}; Stage III student keeps {cfg.stage1.keep_ratio:.0%} of the blocks")
    split = f" ({tokens(cfg, counts) // d.sequence_parallel} per GPU)" if d.sequence_parallel > 1 else ""
    shape = (f"activations: {p.frames} x {p.height} x {p.width} video -> {tokens(cfg, counts)} tokens{split} of width "
             f"{counts.width} (FFN {counts.ffn}), batch {cfg.data.batch_size} per GPU, gradient checkpointing {ckpt}")
    columns = (f"{'GiB per GPU':<8} | {'parameters':>10} | {'gradients':>9} | {'optimizer':>9} | {'gathered':>8} | "
               f"{'activations':>11} | {'GPU total':>9} | {'host RAM/node':>13}")
    lines = [head, shape, columns]
    for name, r in rows.items():
        lines.append(f"{name:<11} | {r['parameters']:>10.2f} | {r['gradients']:>9.2f} | {r['optimizer']:>9.2f} | "
                     f"{r['gathered']:>8.2f} | {r['activations']:>11.2f} | {r['gpu_total']:>9.2f} | "
                     f"{r['host_ram_per_node']:>13.2f}")
    notes = "stage1 runs unsharded on one GPU"
    if d.deepspeed:
        notes += (f"; host RAM/node: {min(max(1, d.world_size), GPUS_PER_NODE)} processes of {PROCESS_GIB} GiB + "
                  + (f"{OPTIMIZER_HOST_BYTES} bytes per trained parameter / W (offloaded optimizer)" if offload else
                     "no optimizer states")
                  + ("" if sharded(cfg) else " or, if more, the fp32 models each loads whole (dist.sharded_load off)")
                  + ("; DS_ACCELERATOR=cpu: what DeepSpeed keeps on the accelerator is host RAM too" if on_cpu
                     else ""))
    lines += [f"({notes}; activations: train/models/memory.py's formula, an estimate)", checkpoint_line(cfg, counts),
              verdict(rows), sequence_parallel_line(cfg, counts)]
    return "\n".join(lines)
