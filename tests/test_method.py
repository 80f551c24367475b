"""Flow convention, Stage I, prune plans, the well-guided teacher and the samplers."""
import json

import pytest
import torch
from tiny_models import tiny_wan, wan_inputs

from fastlightgen.adapters import ModelFingerprint, adapt
from fastlightgen.first_frame import frame_sigma, loss_frames, noised, pin
from fastlightgen.flow import (
    add_noise,
    denoising_list_sigmas,
    euler_sigmas,
    sample_training_sigma,
    shift_sigma,
    velocity_target,
    x0_from_velocity,
)
from fastlightgen.guidance import TeacherMix, well_guided_velocity
from fastlightgen.importance import block_importance, stage1_sigmas
from fastlightgen.plan import PlanMismatchError, PrunePlan
from fastlightgen.sampling import FEW_STEP, Sampling, sample_euler_cfg, sample_few_step
from fastlightgen.toy.teacher import null_like


def test_tweedie_inverts_noising():
    x0, noise = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 4, 3, 4, 4)
    sigma = torch.tensor([0.2, 0.9])
    x_t = add_noise(x0, noise, sigma)
    torch.testing.assert_close(x0_from_velocity(x_t, velocity_target(x0, noise), sigma), x0)


def test_shift_warp():
    assert shift_sigma(torch.tensor(0.5), 5.0).item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))
    assert shift_sigma(torch.tensor(0.3), 1.0).item() == pytest.approx(0.3)
    sig = euler_sigmas(50, 5.0)
    assert sig[0] == 1 and sig[-1] == 0 and len(sig) == 51 and bool((sig[1:] < sig[:-1]).all())


def test_uniform_training_sigmas_follow_the_shifted_sampler():
    """Uniform-then-shift training puts as many draws in a sigma band as the sampler has steps there."""
    steps = euler_sigmas(50, 5.0)[:-1]
    draws = sample_training_sigma(200_000, torch.Generator().manual_seed(0), 5.0, "uniform")
    for low, high in ((0.0, 0.25), (0.25, 0.9), (0.9, 1.001)):
        sampler = ((steps >= low) & (steps < high)).float().mean().item()
        assert ((draws >= low) & (draws < high)).float().mean().item() == pytest.approx(sampler, abs=0.02)
    logit_normal = sample_training_sigma(200_000, torch.Generator().manual_seed(0), 5.0)
    assert (logit_normal < 0.25).float().mean().item() < 0.01  # what the first shift-5 teacher lacked
    with pytest.raises(ValueError, match="unknown sigma law 'normal'; use one of logit_normal, uniform"):
        sample_training_sigma(4, law="normal")


def test_few_step_sigmas_match_lightx2v_and_comfyui():
    sig = denoising_list_sigmas([1000, 750, 500, 250], 5.0)
    torch.testing.assert_close(sig, torch.tensor([1.0, 0.9375, 0.833333, 0.625, 0.0]), atol=1e-5, rtol=0)
    for bad in ([], [750, 1000], [1200], [0]):
        with pytest.raises(ValueError, match="denoising_step_list"):
            denoising_list_sigmas(bad, 5.0)


def _trained_model_with_identity_block(identity: int, steps: int = 150):
    """A tiny Wan briefly trained on a few fixed latents, with block `identity` frozen as an exact identity.

    An untrained model's errors are noise around its reference error, so skipping a random block may even
    help; after a little training the other blocks carry the prediction and skipping them hurts.
    """
    model = tiny_wan("ti2v", layers=5).train()
    block = model.blocks[identity]
    for linear in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[2]):
        linear.weight.data.zero_()
        linear.bias.data.zero_()
        linear.requires_grad_(False)  # every residual branch adds exactly zero
    samples = _samples(model)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    adapter = adapt(model)
    for step in range(steps):
        x0, cond = samples[step % len(samples)]
        noise = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(x0.shape[0], generator=g)
        loss = (adapter(add_noise(x0, noise, sigma), sigma, cond) - velocity_target(x0, noise)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), samples


def _samples(model, n=2):
    return [wan_inputs(model, seed=seed) for seed in range(n)]


def test_stage1_ranks_an_identity_block_least_important_and_prefix_reuse_is_exact():
    model, samples = _trained_model_with_identity_block(identity=2)
    adapter = adapt(model)
    sigmas = stage1_sigmas(3)
    adapter.block_evaluations = 0
    fast = block_importance(adapter, samples, sigmas, seed=3, pin_first_frame=True)
    fast_cost = adapter.block_evaluations
    adapter.block_evaluations = 0
    naive = block_importance(adapter, samples, sigmas, seed=3, pin_first_frame=True, prefix_reuse=False)
    assert fast.ranking[-1] == 2
    assert fast.scores[2] == pytest.approx(fast.reference_error, rel=1e-6)
    torch.testing.assert_close(torch.tensor(fast.scores), torch.tensor(naive.scores), rtol=1e-5, atol=0)
    n, runs = 5, len(samples) * len(sigmas)
    assert fast_cost == runs * (n + n * (n - 1) // 2) and adapter.block_evaluations == runs * (n + n * (n - 1))
    plan = fast.plan(adapter, keep_count=4)
    assert plan.dropped == [2] and plan.method == "scores"


def test_plan_json_round_trip_and_foreign_model_error():
    fp = ModelFingerprint("wan", 10, 256)
    plan = PrunePlan.from_scores(fp, [5, 1, 2, 8, 0, 3, 9, 4, 7, 6], keep_ratio=0.7, protected=[4])
    assert len(plan.kept) == 7 and 4 in plan.kept and plan.dropped == [1, 2, 5]
    again = PrunePlan.from_json(plan.to_json())
    assert again == plan and json.loads(again.to_json())["dropped"] == [1, 2, 5]
    with pytest.raises(PlanMismatchError, match=r"wan with 10 blocks of width 256.*wan with 12 blocks"):
        plan.check(ModelFingerprint("wan", 12, 256))
    with pytest.raises(ValueError, match="do not exist"):
        PrunePlan.from_blocks(fp, [10])
    with pytest.raises(ValueError, match="not a FastLightGen prune plan"):
        PrunePlan.from_dict({"kept": [1]})


def test_well_guided_teacher_limits():
    model = tiny_wan("ti2v", layers=6)
    adapter = adapt(model)
    x, cond = wan_inputs(model)
    null = null_like(cond)
    sigma, skip = torch.tensor([0.5, 0.7]), {2, 3}
    with torch.no_grad():
        v_c = adapter(x, sigma, cond, skip=skip)
        v_null = adapter(x, sigma, null, skip=skip)
        cfg = v_null + 3.0 * (v_c - v_null)
        torch.testing.assert_close(well_guided_velocity(adapter, x, sigma, cond, null, skip, 3.0, 0.0), cfg)
        torch.testing.assert_close(well_guided_velocity(adapter, x, sigma, cond, null, skip, 1.0, 1.0),
                                   adapter(x, sigma, cond))


def test_teacher_mix_jitter_is_seeded_and_bounded():
    mix = TeacherMix(3.5, 0.25)
    draws = [mix.sample(torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws[:5] == [mix.sample(torch.Generator().manual_seed(s)) for s in range(5)]
    b1, b2 = zip(*draws)
    assert 2.5 <= min(b1) < 2.7 and 4.3 < max(b1) <= 4.5
    assert 0.15 <= min(b2) < 0.17 and 0.33 < max(b2) <= 0.35


def test_samplers_are_deterministic_and_pin_the_first_frame():
    model = tiny_wan("ti2v", layers=3)
    adapter = adapt(model)
    x, cond = wan_inputs(model, batch=1)
    first = torch.randn(1, 48, 1, 8, 8)
    runs = [sample_few_step(adapter, x, cond, FEW_STEP, skip={1},
                            generator=torch.Generator().manual_seed(7), first_frame=first) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0][:, :, :1], first)
    other = sample_few_step(adapter, x, cond, generator=torch.Generator().manual_seed(8), first_frame=first)
    assert not torch.equal(runs[0], other)
    teacher = [sample_euler_cfg(adapter, x, cond, null_like(cond), Sampling(steps=4)) for _ in range(2)]
    assert torch.equal(teacher[0], teacher[1]) and torch.isfinite(teacher[0]).all()


def test_few_step_sampler_counts_model_calls():
    model = tiny_wan("ti2v", layers=3)
    adapter = adapt(model)
    x, cond = wan_inputs(model, batch=1)
    adapter.block_evaluations = 0
    sample_few_step(adapter, x, cond, Sampling.few_step((1000, 500)), skip={0}, generator=torch.Generator())
    assert adapter.block_evaluations == 2 * 2  # 2 steps x 2 kept blocks, no CFG pass


def test_sampling_contract_gives_each_kind_its_schedule():
    torch.testing.assert_close(Sampling(steps=50, shift=5.0).sigmas, euler_sigmas(50, 5.0))
    torch.testing.assert_close(FEW_STEP.sigmas, denoising_list_sigmas([1000, 750, 500, 250], 5.0))
    assert (FEW_STEP.steps, FEW_STEP.cfg_scale, FEW_STEP.nfe, Sampling(steps=50, cfg_scale=3.5).nfe) == (4, 1.0, 4, 100)
    assert Sampling.from_dict({"steps": 4, "shift": 5, "cfg_scale": 1, "denoising_step_list": [1000, 750, 500, 250]}) \
        == FEW_STEP
    with pytest.raises(ValueError, match="runs 2 steps without CFG"):
        Sampling(steps=4, cfg_scale=1.0, denoising_step_list=(1000, 500))
    model = tiny_wan("ti2v", layers=2)
    x, cond = wan_inputs(model, batch=1)
    with pytest.raises(ValueError, match="few-step sampler runs without CFG"):
        sample_few_step(adapt(model), x, cond, Sampling(steps=4, cfg_scale=3.0))


def test_first_frame_rule_pins_the_frame_at_sigma_zero_and_out_of_the_loss():
    x0 = torch.randn(2, 4, 3, 2, 2)
    first = x0[:, :, :1]
    sigma = torch.tensor([0.3, 0.8])
    assert torch.equal(frame_sigma(sigma, x0, ti2v=False), sigma)
    assert torch.equal(frame_sigma(sigma, x0, ti2v=True), torch.tensor([[0.0, 0.3, 0.3], [0.0, 0.8, 0.8]]))
    x_t, sig, noise = noised(x0, sigma, torch.Generator().manual_seed(0), first)
    assert torch.equal(x_t[:, :, :1], first) and sig.shape == (2, 3)
    torch.testing.assert_close(x_t[:, :, 1:], add_noise(x0, noise, sigma)[:, :, 1:])
    assert torch.equal(pin(torch.zeros_like(x0), first)[:, :, :1], first) and pin(x0, None) is x0
    assert loss_frames(x0, ti2v=True).shape[2] == 2 and loss_frames(x0, ti2v=False) is x0


def test_an_expert_pair_samples_as_its_experts_taking_their_own_steps():
    """ExpertPair hands each call to the expert whose range holds its sigma (TI2V's given first frame, at 0, does not
    choose): the few-step student at shift 5 equals its high expert for the first two steps and its low expert for
    the last two, done by hand; a batch straddling the boundary is refused."""
    from fastlightgen.experts import ExpertPair, split_sigmas

    high, low = adapt(tiny_wan("ti2v", layers=2, seed=1)), adapt(tiny_wan("ti2v", layers=2, seed=2))
    pair = ExpertPair(high, low, 0.875)
    x, cond = wan_inputs(high.model, batch=1)
    first = torch.randn(1, 48, 1, 8, 8)
    got = sample_few_step(pair, x, cond, FEW_STEP, generator=torch.Generator().manual_seed(3), first_frame=first)
    by_hand, g = pin(x, first), torch.Generator().manual_seed(3)
    steps_high, steps_low = split_sigmas(FEW_STEP.sigmas, 0.875)
    assert steps_high.tolist() == pytest.approx([1.0, 0.9375, 0.8333333]) and len(steps_low) == 3
    sigmas = FEW_STEP.sigmas.tolist()
    with torch.no_grad():
        for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
            expert = high if i < 2 else low
            sig = frame_sigma(s, by_hand, True)
            x0 = pin(x0_from_velocity(by_hand, expert.forward(by_hand, sig, cond), sig), first)
            by_hand = noised(x0, s_next, g, first)[0] if s_next > 0 else x0
    assert torch.equal(got, by_hand)
    with pytest.raises(ValueError, match="rows lie on both sides of the boundary 0.875"):
        pair.forward(x.repeat(2, 1, 1, 1, 1), torch.tensor([0.9, 0.5]), cond.repeat(2))
