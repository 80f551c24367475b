"""`python -m research.bench.e2e`: one video end to end, teacher against student, part by part.

What a creator waits for, for each config (default: both shipped Wan configs): text encoding (UMT5, the
transformers class), the transformer (the teacher's 50-step Euler with CFG, 100 evaluations of every block,
against the student: the config's keep-ratio pruned model at 4 steps) and the VAE decode, with the stock Wan
VAE (diffusers' AutoencoderKLWan: Wan 2.1's 16-channel one, or Wan 2.2 TI2V-5B's 48-channel one) and with the
stock tiny decoder ComfyUI's VAE loader builds for that latent (comfy.taesd.taehv.TAEHV, the architecture of
taew2_1 / lighttaew2_1 and taew2_2 / lighttaew2_2). Every model has random weights of its real architecture:
a call costs the same whatever the values. All parts of a config are timed side by side in one run, in
alternating rounds (research.timing), each part's time its fastest round; on CUDA in bf16 when there is a GPU.

The teacher's transformer is timed over its first `--teacher-steps` steps (default 2: 4 of its 100
evaluations) and scaled to its 50 steps, since each step costs the same (two evaluations and an Euler update);
a full run of the 5B teacher takes about 100 s a call. `--teacher-steps 50` times it whole. The table says
which. Models are cast as diffusers' from_pretrained(torch_dtype=bf16) loads them (a transformer's
_keep_in_fp32_modules stay in float32), as research.bench.gpu's sampling measurement does. The teacher
encodes the prompt and the negative prompt (CFG), the student the prompt alone, from random token ids (512:
the length Wan pads to; the tokenizer's milliseconds are left out). The student's video is decoded; the TI2V
start image's encode (one frame, the same for both) is left out.

--size smoke: the same code at 5 frames of 64x64 with tiny widths (transformer, UMT5 and full VAE; the tiny
decoder has one size) on the CPU in seconds: a test of the bench, not a figure.
--decode-only: the two decoders alone at the config's latent size (`--latent-frames` keeps the first frames
of it: a real-size decode on a CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fastlightgen.adapters import Conditioning, DiTAdapter, adapt
from fastlightgen.sampling import Sampling
from train.config import Config, load_config

from ..comfyui_harness import import_comfy_in_process
from ..timing import seconds_per_call
from .gpu import TEXT_TOKENS, latent_shape, middle_plan, random_wan, sampler_calls

CONFIGS = ("configs/wan2.2-ti2v-5b.yaml", "configs/wan2.1-t2v-1.3b.yaml")
TEACHER = Sampling()  # the teacher as its model card samples it: 50 Euler steps, shift 5, CFG 5
TEACHER_STEPS_TIMED = 2  # default: 4 of the teacher's 100 evaluations, scaled to them
Decoder = Callable[[torch.Tensor], torch.Tensor]  # a normalized latent (B, C, f, h, w) -> video (B, 3, F, H, W)
Encoder = Callable[[int], list[torch.Tensor]]  # n prompts -> their UMT5 sequences (1, TEXT_TOKENS, D) each

# google/umt5-xxl, the text encoder of every Wan (5.7B; ComfyUI's text_encoders/umt5_config_xxl.json is the same)
UMT5_XXL = {"vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64}
# Wan 2.2 TI2V-5B's VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers, vae/config.json) where it differs from diffusers'
# defaults, which are Wan 2.1's VAE; latents_mean / latents_std of both come from ComfyUI's latent formats
WAN22_VAE = {"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "in_channels": 12, "out_channels": 12,
             "patch_size": 2, "scale_factor_spatial": 16, "is_residual": True}


@dataclass(frozen=True)
class Size:
    """What --size sets: the video and the widths of the models, and how many rounds are timed."""

    overrides: tuple[str, ...]  # config settings: the video and the transformer's widths (its depth is kept)
    umt5: dict[str, int]  # UMT5Config fields; the transformer's text_dim follows d_model
    vae_width: int | None  # the full VAE's base widths; None: the real ones
    rounds: int


SIZES = {
    "real": Size((), UMT5_XXL, None, rounds=3),
    "smoke": Size(("preprocess.frames=5", "preprocess.height=64", "preprocess.width=64",
                   "model.arch.num_attention_heads=2", "model.arch.attention_head_dim=16", "model.arch.ffn_dim=64"),
                  {"vocab_size": 1000, "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2},
                  vae_width=16, rounds=2),
}


def config_for(path: str, size: Size) -> Config:
    return load_config(path, [*size.overrides, f"model.arch.text_dim={size.umt5['d_model']}"])


def text_encoder(fields: dict[str, int], device: torch.device, dtype: torch.dtype) -> Encoder:
    """UMT5's encoder with random weights; the call encodes the first n of two fixed random prompts."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: the XXL's 5.7B parameters initialise in seconds there
        model = UMT5EncoderModel(UMT5Config(**fields)).to(dtype).eval()
    ids = torch.randint(fields["vocab_size"], (2, 1, TEXT_TOKENS), generator=torch.Generator().manual_seed(0))

    def encode(n: int) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(input_ids=i.to(device)).last_hidden_state for i in ids[:n]]
    return encode


def loaded_as(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A diffusers model in `dtype` as from_pretrained(torch_dtype=dtype) loads it: parameters of its class's
    _keep_in_fp32_modules (Wan's norms, time embedder and rope) stay in float32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    return model


def wan_models(cfg: Config, device: torch.device, dtype: torch.dtype) -> tuple[DiTAdapter, DiTAdapter]:
    """The teacher with random weights and its student: the config's keep ratio, Stage I's U-shape."""
    with tempfile.TemporaryDirectory() as folder:
        dropped = set(middle_plan(cfg, Path(folder) / "plan.json"))
    with torch.device(device):
        teacher = adapt(loaded_as(random_wan(cfg), dtype).eval())
        student = adapt(teacher.pruned_model([i for i in range(teacher.num_blocks) if i not in dropped]))
    return teacher, student


def latent_stats(channels: int) -> dict[str, list[float]]:
    import_comfy_in_process()
    import comfy.latent_formats

    fmt = {16: comfy.latent_formats.Wan21, 48: comfy.latent_formats.Wan22}[channels]()
    return {"latents_mean": fmt.latents_mean.flatten().tolist(), "latents_std": fmt.latents_std.flatten().tolist()}


def wan_vae(channels: int, width: int | None, device: torch.device, dtype: torch.dtype) -> Decoder:
    """The stock Wan VAE for that latent width with random weights; decodes as WanPipeline does (the latent
    un-normalized by latents_mean / latents_std first)."""
    from diffusers import AutoencoderKLWan

    config = {**(WAN22_VAE if channels == 48 else {}), **latent_stats(channels)}
    if width:
        config.update(base_dim=width, decoder_base_dim=width)
    torch.manual_seed(0)
    with torch.device(device):
        vae = loaded_as(AutoencoderKLWan.from_config(config), dtype).eval()
    mean, std = (torch.tensor(config[k]).view(1, -1, 1, 1, 1).to(device, dtype)
                 for k in ("latents_mean", "latents_std"))

    def decode(latent: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vae.decode(latent * std + mean).sample
    return decode


def random_taehv(channels: int) -> torch.nn.Module:
    """ComfyUI's tiny video decoder for that latent width, as its VAE loader builds it from a file with
    `decoder.22.bias` (taew2_1 / lighttaew2_1 at 16 channels, taew2_2 / lighttaew2_2 at 48), with random weights.
    ComfyUI's layers leave their weights unset, so each is drawn here: N(0, 1/fan_in), biases 0."""
    import_comfy_in_process()
    import comfy.taesd.taehv

    model = comfy.taesd.taehv.TAEHV(latent_channels=channels, latent_format=None, show_progress_bar=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5 if p.ndim > 1 else torch.zeros(p.shape))
    return model.eval()


def tiny_decoder(channels: int, device: torch.device, dtype: torch.dtype) -> Decoder:
    model = random_taehv(channels).to(device, dtype)

    def decode(latent: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.decode(latent)
    return decode


def decoders(cfg: Config, size: Size, device: torch.device, dtype: torch.dtype) -> dict[str, Decoder]:
    channels = cfg.model.arch["in_channels"]
    return {"vae": wan_vae(channels, size.vae_width, device, dtype), "tiny": tiny_decoder(channels, device, dtype)}


def output_checks(latent: torch.Tensor, videos: dict[str, torch.Tensor]) -> dict:
    """What one video came out as: each decoder's video shape, and whether the latent and videos are finite."""
    return {"shapes": {k: list(v.shape) for k, v in videos.items()},
            "finite": {k: bool(torch.isfinite(v).all()) for k, v in {"latent": latent, **videos}.items()}}


def summarise(seconds: dict[str, float], teacher_scale: float) -> dict:
    """Each part's seconds per video (the teacher's transformer scaled to its 50 steps), the totals and ratios."""
    teacher = {"text": seconds["teacher_text"], "transformer": seconds["teacher_transformer"] * teacher_scale}
    student = {"text": seconds["student_text"], "transformer": seconds["student_transformer"]}
    decode = {"vae": seconds["vae"], "tiny": seconds["tiny"]}
    totals = {f"{who}_{d}": sum(parts.values()) + decode[d]
              for who, parts in (("teacher", teacher), ("student", student)) for d in decode}
    return {"seconds": {"teacher": teacher, "student": student, "decode": decode,
                        "teacher_transformer_timed": seconds["teacher_transformer"]},
            "totals": totals,
            "ratios": {"transformer": teacher["transformer"] / student["transformer"],
                       "end_to_end_vae": totals["teacher_vae"] / totals["student_vae"],
                       "end_to_end_tiny": totals["teacher_tiny"] / totals["student_tiny"],
                       "teacher_vae_to_student_tiny": totals["teacher_vae"] / totals["student_tiny"]},
            "vae_share_of_student": decode["vae"] / totals["student_vae"]}


def measure(cfg: Config, size: Size, encode: Encoder, device: torch.device, dtype: torch.dtype, rounds: int,
            teacher_steps: int) -> dict:
    teacher, student = wan_models(cfg, device, dtype)
    decode = decoders(cfg, size, device, dtype)
    prompt, negative = encode(2)
    noise = torch.randn(latent_shape(cfg, 1), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    teacher_video, student_video = sampler_calls(teacher, student, noise, Conditioning(text=prompt),
                                                 Conditioning(text=negative), cfg.model.ti2v,
                                                 dataclasses.replace(TEACHER, steps=teacher_steps))
    latent = student_video()  # the video a creator decodes
    outputs = output_checks(latent, {k: d(latent) for k, d in decode.items()})
    calls = {"teacher_text": lambda: encode(2), "student_text": lambda: encode(1),
             "teacher_transformer": teacher_video, "student_transformer": student_video,
             "vae": lambda: decode["vae"](latent), "tiny": lambda: decode["tiny"](latent)}
    seconds = dict(zip(calls, seconds_per_call(*calls.values(), rounds=rounds, round_seconds=0.0, device=device)))
    return {"video": [cfg.preprocess.frames, cfg.preprocess.height, cfg.preprocess.width],
            "latent": list(latent.shape), "blocks": {"teacher": teacher.num_blocks, "student": student.num_blocks},
            "teacher_steps": TEACHER.steps, "teacher_steps_timed": teacher_steps, "outputs": outputs,
            **summarise(seconds, TEACHER.steps / teacher_steps)}


def measure_decode(cfg: Config, size: Size, device: torch.device, dtype: torch.dtype, rounds: int,
                   latent_frames: int | None) -> dict:
    """The two decoders alone on a random latent of the config's size (its first `latent_frames` frames)."""
    decode = decoders(cfg, size, device, dtype)
    latent = torch.randn(latent_shape(cfg, 1), generator=torch.Generator().manual_seed(0))[:, :, :latent_frames]
    latent = latent.to(device, dtype)
    vae_s, tiny_s = seconds_per_call(lambda: decode["vae"](latent), lambda: decode["tiny"](latent), rounds=rounds,
                                     round_seconds=0.0, device=device)
    return {"latent": list(latent.shape), "outputs": output_checks(latent, {k: d(latent) for k, d in decode.items()}),
            "seconds": {"decode": {"vae": vae_s, "tiny": tiny_s}}, "ratios": {"vae_to_tiny": vae_s / tiny_s}}


def print_table(path: str, r: dict) -> None:
    if "totals" not in r:  # --decode-only
        d = r["seconds"]["decode"]
        print(f"{path}: decode of a {'x'.join(map(str, r['latent']))} latent to {r['outputs']['shapes']['vae']}: "
              f"Wan VAE {d['vae']:.3f} s, tiny decoder {d['tiny']:.3f} s: {r['ratios']['vae_to_tiny']:.1f}x")
        return
    s, t, x = r["seconds"], r["totals"], r["ratios"]
    scaled = ("" if r["teacher_steps_timed"] == r["teacher_steps"] else
              f" (teacher: {r['teacher_steps_timed']} of its {r['teacher_steps']} steps timed, "
              f"x{r['teacher_steps'] / r['teacher_steps_timed']:g})")
    rows = [("text encoding (UMT5)", s["teacher"]["text"], s["student"]["text"], ""),
            ("transformer", s["teacher"]["transformer"], s["student"]["transformer"],
             f"{x['transformer']:.1f}x{scaled}"),
            ("decode, Wan VAE", s["decode"]["vae"], s["decode"]["vae"], ""),
            ("decode, tiny decoder", s["decode"]["tiny"], s["decode"]["tiny"], ""),
            ("end to end, Wan VAE", t["teacher_vae"], t["student_vae"], f"{x['end_to_end_vae']:.1f}x"),
            ("end to end, tiny decoder", t["teacher_tiny"], t["student_tiny"], f"{x['end_to_end_tiny']:.1f}x")]
    frames, height, width = r["video"]
    print(f"\n{path}: {frames} frames at {height}x{width}, student {r['blocks']['student']}/{r['blocks']['teacher']} "
          f"blocks at 4 steps")
    print(f"{'seconds per video':<26} {'teacher':>10} {'student':>10}  teacher/student")
    for name, teacher_s, student_s, ratio in rows:
        print(f"{name:<26} {teacher_s:>10.3f} {student_s:>10.3f}  {ratio}")
    print(f"teacher with the Wan VAE / student with the tiny decoder: {x['teacher_vae_to_student_tiny']:.1f}x; "
          f"the Wan VAE is {100 * r['vae_share_of_student']:.0f}% of the student's time")
    if not all(r["outputs"]["finite"].values()):
        print(f"note: random weights gave non-finite values {r['outputs']['finite']} (the times stand)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", action="append", help=f"repeatable (default: {', '.join(CONFIGS)})")
    parser.add_argument("--size", choices=sorted(SIZES), default="real")
    parser.add_argument("--teacher-steps", type=int, default=TEACHER_STEPS_TIMED,
                        help=f"teacher steps timed, scaled to its {TEACHER.steps} (default %(default)s)")
    parser.add_argument("--rounds", type=int, help="timed rounds per part (default: the size's)")
    parser.add_argument("--decode-only", action="store_true", help="time the two decoders alone")
    parser.add_argument("--latent-frames", type=int, help="with --decode-only: decode the latent's first frames")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    rounds = args.rounds or size.rounds
    if not 1 <= args.teacher_steps <= TEACHER.steps:
        parser.error(f"--teacher-steps takes 1 to {TEACHER.steps}, got {args.teacher_steps}")
    cuda = torch.cuda.is_available()
    if args.size == "real" and not cuda and not args.decode_only:
        raise SystemExit("--size real needs a CUDA GPU (the 5.7B UMT5 and 100 teacher evaluations); --size smoke "
                         "runs this code on the CPU, --decode-only --latent-frames 1 a real-size decode")
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    results = {"size": args.size, "device": torch.cuda.get_device_name(0) if cuda else "CPU", "dtype": str(dtype),
               "configs": {}}
    print(f"{results['device']}, {dtype}, --size {args.size}" + ("" if args.size == "real" else
                                                               ": a test of the bench, not a figure"), flush=True)
    encode = None if args.decode_only else text_encoder(size.umt5, device, dtype)
    for path in args.config or CONFIGS:
        cfg = config_for(path, size)
        results["configs"][path] = (measure_decode(cfg, size, device, dtype, rounds, args.latent_frames)
                                    if args.decode_only else
                                    measure(cfg, size, encode, device, dtype, rounds, args.teacher_steps))
        print_table(path, results["configs"][path])
        if args.json:  # after each config: one that fails or runs out of time keeps the earlier results
            Path(args.json).write_text(json.dumps(results, indent=1))
        if cuda:
            torch.cuda.empty_cache()  # the next config's models get the memory this one's held


if __name__ == "__main__":
    sys.exit(main())
