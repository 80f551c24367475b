"""`python -m research.bench.method`: cost ratios of the library's shortcuts, measured in one run.

Prints, on a randomly initialised Wan 2.2 TI2V-shaped model (48 latent channels, 4096-wide text):
- Stage I with prefix reuse vs the naive N+1 full passes (target <= 0.55x),
- Stage II's forward as training runs it (`distill.run_branches`: the pruned branch with gradients and the
  unpruned one without, sharing the blocks before the first skipped one) vs two separate passes,
- parameters of a physically pruned model keeping 70% of the blocks vs the full one (target <= 0.72x).
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from diffusers import WanTransformer3DModel

from fastlightgen.adapters import Conditioning, adapt
from fastlightgen.branches import Branch, run_branches
from fastlightgen.importance import block_importance, stage1_sigmas
from fastlightgen.plan import PrunePlan

from ..timing import seconds_per_call


def _block_evaluations(adapter, fn: Callable[[], object]) -> int:
    adapter.block_evaluations = 0
    fn()
    return adapter.block_evaluations


def bench_model(blocks: int, width: int) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(num_attention_heads=width // 128, attention_head_dim=128, in_channels=48,
                                 out_channels=48, text_dim=4096, ffn_dim=4 * width, num_layers=blocks).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    adapter = adapt(bench_model(args.blocks, args.width))
    n = adapter.num_blocks
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 48, args.frames, 16, 16, generator=g)
    cond = Conditioning(text=torch.randn(1, 16, 4096, generator=g))
    samples, sigmas = [(x0, cond)], stage1_sigmas(2)
    rows = []

    def stage1(reuse: bool) -> Callable[[], object]:
        return lambda: block_importance(adapter, samples, sigmas, prefix_reuse=reuse)
    reuse, naive = seconds_per_call(stage1(True), stage1(False), rounds=args.repeats, round_seconds=0.0)
    evals = _block_evaluations(adapter, stage1(True)), _block_evaluations(adapter, stage1(False))
    rows.append(("Stage I: prefix reuse / naive N+1 passes (time)", reuse / naive, 0.55))
    rows.append((f"Stage I: prefix reuse / naive (block evaluations {evals[0]} vs {evals[1]})", evals[0] / evals[1],
                 0.55))

    plan = PrunePlan.from_scores(adapter.fingerprint(), [abs(i - n / 2) for i in range(n)], keep_ratio=0.7)
    sigma = torch.tensor([0.5])

    def separate() -> None:
        adapter(x0, sigma, cond, skip=plan.skip)
        with torch.no_grad():
            adapter(x0, sigma, cond)
    shared, two = seconds_per_call(
        lambda: run_branches(adapter, x0, sigma, cond, [Branch(plan.skip, grad=True), Branch(frozenset())]),
        separate, rounds=args.repeats, round_seconds=0.0)
    rows.append((f"Stage II forward: shared prefix / two passes (drop {plan.dropped})", shared / two, None))

    full = sum(p.numel() for p in adapter.model.parameters())
    pruned = sum(p.numel() for p in adapter.pruned_model(plan.kept).parameters())
    rows.append((f"parameters: {len(plan.kept)}/{n} blocks kept / full ({pruned:,} / {full:,})", pruned / full, 0.72))

    print(f"FastLightGen library benchmark: random Wan 2.2-shaped DiT, {n} blocks x width {args.width}, "
          f"latent 48x{args.frames}x16x16, {torch.get_num_threads()} threads, "
          f"best of {args.repeats} alternating rounds")
    print(f"{'measure':<70} {'ratio':>7}  target")
    for name, ratio, target in rows:
        verdict = "" if target is None else (f"<= {target}  {'OK' if ratio <= target else 'MISSED'}")
        print(f"{name:<70} {ratio:7.3f}  {verdict}")


if __name__ == "__main__":
    main()
