"""Benchmark of the ComfyUI nodes, in process on ComfyUI's own modules (CPU):

1. FastLightGen Sampler vs the stock SamplerCustom (lcm, cfg 1) on the same model, latent and sigmas:
   wall-time ratio, the best of alternating rounds (target <= 1.03x);
2. memory of the physically pruned checkpoint (70% of the blocks kept) vs the teacher, as ComfyUI loads them.

Uses the shipped toy teacher when present, else a random one of the same shape.
    OMP_NUM_THREADS=1 python -m research.bench.nodes [--runs 30]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_pack():
    from research import comfyui_harness

    comfyui_harness.import_comfy_in_process()
    spec = importlib.util.spec_from_file_location("FastLightGen", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["FastLightGen"] = pack
    spec.loader.exec_module(pack)
    asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())  # registers models/fastlightgen


def export_models(folder: Path) -> None:
    from fastlightgen.adapters import adapt
    from fastlightgen.checkpoint import CheckpointMeta, load_wan, save_checkpoint
    from fastlightgen.toy.teacher import TOY_TEACHER, build_toy_teacher

    shipped = REPO / "models" / "fastlightgen" / "toy_teacher.safetensors"
    teacher = load_wan(shipped)[0] if shipped.exists() else build_toy_teacher(TOY_TEACHER)
    n = len(teacher.blocks)
    kept = list(range(0, n))[: round(0.7 * n)]  # which blocks does not matter for memory or speed
    save_checkpoint(folder / "bench_teacher.safetensors", teacher, CheckpointMeta(n, list(range(n))))
    save_checkpoint(folder / "bench_pruned.safetensors", adapt(teacher).pruned_model(kept), CheckpointMeta(n, kept))


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.diffusion_model.state_dict().values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--batch", type=int, default=1, help="videos per sampling call")
    args = parser.parse_args(argv)
    load_pack()
    import comfy.samplers
    import folder_paths
    import torch
    from comfy_extras.nodes_custom_sampler import SamplerCustom
    from FastLightGen.nodes import loader, sampling, toy

    from ..timing import seconds_per_call

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        export_models(Path(tmp))
        folder_paths.add_model_folder_path(loader.FOLDER, tmp)
        teacher, sigmas, _ = loader.LoadCheckpoint.execute("bench_teacher.safetensors").args
        pruned, _, info = loader.LoadCheckpoint.execute("bench_pruned.safetensors").args
        sizes = {k: (Path(tmp) / f"bench_{k}.safetensors").stat().st_size for k in ("teacher", "pruned")}
    latent, caption, _ = toy.ToyFirstFrameLatent.execute("red", "circle", "right", "plain", 0, "", args.batch).args
    positive = toy.ToyTextEncode.execute(caption).args[0]
    lcm = comfy.samplers.sampler_object("lcm")

    def ours() -> torch.Tensor:
        return sampling.FastLightGenSampler.execute(teacher, positive, latent, 0, sigmas).args[0]["samples"]

    def stock() -> torch.Tensor:
        return SamplerCustom.execute(teacher, True, 0, 1.0, positive, positive, lcm, sigmas, latent).args[0]["samples"]

    assert torch.equal(ours(), stock()), "the two samplers disagree"
    t_ours, t_stock = seconds_per_call(ours, stock, rounds=args.runs, round_seconds=0.0)
    print(f"sampler: FastLightGen Sampler {t_ours * 1e3:.1f} ms vs stock SamplerCustom+lcm {t_stock * 1e3:.1f} ms "
          f"(best of {args.runs} alternating rounds, {sigmas.shape[-1] - 1} steps, batch {args.batch}): "
          f"ratio {t_ours / t_stock:.3f}x (target <= 1.03x)")
    mem_t, mem_p = weight_bytes(teacher), weight_bytes(pruned)
    print(f"memory: pruned checkpoint ({info.split(';')[0]}) {mem_p / 2**20:.1f} MiB vs teacher "
          f"{mem_t / 2**20:.1f} MiB of DiT weights in ComfyUI: ratio {mem_p / mem_t:.3f}x; "
          f"files {sizes['pruned'] / 2**20:.1f} vs {sizes['teacher'] / 2**20:.1f} MiB "
          f"({sizes['pruned'] / sizes['teacher']:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
