"""Loss math of Stages II and III (paper eq. 5-9), written once over the adapter interface.

Stage II (eq. 5-7): the pruned path vP (a random subset of the plan's dropped blocks skipped) learns
    alpha * ||vP - SG(vU)||^2 + (1 - alpha) * (||vP - target||^2 + ||vU - target||^2),
    SG(vU) from the same weights or given (from a frozen copy or an EMA of them).
Stage III (eq. 8-9): DMD2-style distribution matching. The few-step student's x0 is pushed along
    (x0_fake - x0_real), the difference of the fake and the well-guided real score's Tweedie x0.

Predictions of one input share the blocks before their paths part (`fastlightgen.branches`, the one
shared-prefix engine); only branches that need gradients record them.
TI2V: the first latent frame is given, so no loss is taken on it (`skip_first_frame`, `first_frame.loss_frames`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .adapters.base import Conditioning, DiTAdapter
from .branches import Branch, run_branches
from .first_frame import loss_frames, noised, pin
from .guidance import guided_predictions, mix_velocities
from .lora import lora_enabled
from .sampling import Velocity, predict_x0

# ---- losses ---------------------------------------------------------------------------------------

def mse(a: torch.Tensor, b: torch.Tensor, skip_first_frame: bool) -> torch.Tensor:
    """Mean squared error in fp32 over (B, C, F, H, W), leaving out the given first frame for TI2V."""
    return (loss_frames(a, skip_first_frame).float() - loss_frames(b, skip_first_frame).float()).pow(2).mean()


def sample_skip(dropped: Sequence[int], p: float, generator: torch.Generator) -> frozenset[int]:
    """Stage II's dynamic pruning: each of the plan's dropped blocks is skipped independently with prob. p.

    p = 1 always trains the fully pruned path; p = 0.5 (the paper) trains the random sub-models between
    the pruned and the unpruned model, all sharing the unpruned model's weights.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"skip probability must be in [0, 1], got {p}")
    draws = torch.rand(len(dropped), generator=generator, dtype=torch.float64).tolist()
    return frozenset(int(b) for b, u in zip(dropped, draws) if u < p)


def stage2_loss(adapter: DiTAdapter, x_t: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                target: torch.Tensor, skip: frozenset[int], alpha: float, skip_first_frame: bool,
                unpruned_target: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 7 = eq. 6 (distillation, weight alpha) + eq. 5 (flow matching on both paths, weight 1 - alpha).

    The distillation target SG(vU) is the unpruned path of `adapter` itself, sharing the pruned pass's prefix
    (the paper's form), or `unpruned_target`: vU already computed without gradients from other weights (a
    frozen copy, an EMA). Flow matching (alpha < 1) always trains the unpruned path of `adapter`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    needs_unpruned_grad = alpha < 1.0
    branches = [Branch(skip, grad=True)]
    if unpruned_target is None or needs_unpruned_grad:
        branches.append(Branch(frozenset(), grad=needs_unpruned_grad))
    v_pruned, *v_rest = run_branches(adapter, x_t, sigma, cond, branches)
    v_unpruned = v_rest[0] if v_rest else None
    distill = mse(v_pruned, v_unpruned.detach() if unpruned_target is None else unpruned_target, skip_first_frame)
    loss = alpha * distill
    parts = {"distill": distill.item()}
    if needs_unpruned_grad:
        fm_pruned = mse(v_pruned, target, skip_first_frame)
        fm_unpruned = mse(v_unpruned, target, skip_first_frame)
        loss = loss + (1 - alpha) * (fm_pruned + fm_unpruned)
        parts.update(fm_pruned=fm_pruned.item(), fm_unpruned=fm_unpruned.item())
    return loss, parts


# ---- Stage III ----------------------------------------------------------------------------------

def backward_simulation(student: Velocity, noise: torch.Tensor, sigmas: Sequence[float], stop: int,
                        generator: torch.Generator, first_frame: torch.Tensor | None) -> torch.Tensor:
    """The student's input at step `stop` of the few-step list, reached by running steps 0..stop-1
    as at inference (predict x0, re-noise to the next sigma with fresh noise), without gradients."""
    x = pin(noise, first_frame)
    with torch.no_grad():
        for s, s_next in zip(sigmas[:stop], sigmas[1:stop + 1]):
            x = noised(predict_x0(student, x, s, first_frame), s_next, generator, first_frame)[0]
    return x


def teacher_scores(adapter: DiTAdapter, lora_model: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                   cond: Conditioning, null_cond: Conditioning, pruned_skip: frozenset[int], beta1: float,
                   beta2: float, fake_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_real, v_fake): eq. 9's well-guided teacher (LoRA off) and the fake score (LoRA on, pruned path).

    The teacher's three predictions come from one batched `guided_predictions` call; the fake score is one
    more pruned pass. Its LoRA sits on every kept block: with it only past the first dropped block (where
    it could share the prefix too) the fake score could not follow the student, and DMD then pushed a fixed
    direction.
    """
    with torch.no_grad(), lora_enabled(lora_model, False):
        v_pruned_c, v_pruned_null, v_unpruned_c = guided_predictions(adapter, x_t, sigma, cond, null_cond, pruned_skip)
    v_real = mix_velocities(v_pruned_c.float(), v_pruned_null.float(), v_unpruned_c.float(), beta1, beta2)
    return v_real, fake_velocity(adapter, lora_model, x_t, sigma, cond, pruned_skip, grad=fake_grad)


def fake_velocity(adapter: DiTAdapter, lora_model: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor,
                  cond: Conditioning, pruned_skip: frozenset[int], grad: bool = True) -> torch.Tensor:
    (v,) = run_branches(adapter, x_t, sigma, cond, [Branch(pruned_skip, grad=grad, lora=True)], lora_model)
    return v.float()


def dmd_generator_loss(x0_gen: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                       skip_first_frame: bool) -> torch.Tensor:
    """DMD2: grad = (x0_fake - x0_real) / mean|x0_gen - x0_real| per sample; loss = 0.5 ||x0 - SG(x0 - grad)||^2,
    whose gradient w.r.t. x0_gen is grad / numel (eq. 8's score difference, normalized)."""
    x0_gen, x0_real, x0_fake = (loss_frames(x, skip_first_frame).float() for x in (x0_gen, x0_real, x0_fake))
    with torch.no_grad():
        dims = tuple(range(1, x0_gen.ndim))
        normalizer = (x0_gen - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-6)
        grad = (x0_fake - x0_real) / normalizer
    return 0.5 * (x0_gen - (x0_gen - grad).detach()).pow(2).mean()

