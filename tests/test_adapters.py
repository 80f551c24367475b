"""Adapter seam on tiny configs of the real diffusers classes."""
import pytest
import torch
from tiny_models import hunyuan_inputs, tiny_hunyuan, tiny_wan, wan_inputs

from fastlightgen.adapters import adapt
from fastlightgen.guidance import guided_predictions
from fastlightgen.toy.teacher import null_like

SIGMA = torch.tensor([0.3, 0.8])


def _wan_reference(model, x, sigma, cond):
    return model(x, sigma * 1000, cond.text, cond.image, return_dict=False)[0]


@pytest.mark.parametrize("variant", ["t2v", "i2v", "ti2v"])
def test_wan_split_forward_equals_model_forward(variant):
    model = tiny_wan(variant)
    x, cond = wan_inputs(model)
    with torch.no_grad():
        assert torch.equal(adapt(model)(x, SIGMA, cond), _wan_reference(model, x, SIGMA, cond))


def test_wan22_per_frame_sigma_is_per_token_timestep():
    model = tiny_wan("ti2v")
    x, cond = wan_inputs(model, frames=3)
    sigma = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.2, 0.2]])
    tokens = (x.shape[3] // 2) * (x.shape[4] // 2)
    with torch.no_grad():
        ref = model(x, (sigma * 1000).repeat_interleave(tokens, dim=1), cond.text, return_dict=False)[0]
        assert torch.equal(adapt(model)(x, sigma, cond), ref)


def test_hunyuan_split_forward_equals_model_forward():
    model = tiny_hunyuan()
    x, cond = hunyuan_inputs()
    with torch.no_grad():
        ref = model(x, SIGMA * 1000, cond.text, cond.text_mask, cond.pooled,
                    guidance=torch.full((2,), 6000.0), return_dict=False)[0]
        assert torch.equal(adapt(model)(x, SIGMA, cond), ref)


def _cases():
    wan = tiny_wan("ti2v", layers=6)
    hy = tiny_hunyuan(double=2, single=3)
    return [(wan, wan_inputs(wan), [1, 4]), (hy, hunyuan_inputs(), [1, 3])]


@pytest.mark.parametrize("case", range(2), ids=["wan", "hunyuan"])
def test_skipping_equals_physically_pruned_model(case):
    model, (x, cond), skip = _cases()[case]
    adapter = adapt(model)
    keep = [i for i in range(adapter.num_blocks) if i not in skip]
    pruned = adapter.pruned_model(keep)
    # a plain strict load of the renumbered state dict into a K-block config
    fresh = type(model).from_config(adapter.pruned_config(keep))
    fresh.load_state_dict(adapter.pruned_state_dict(keep), strict=True)
    with torch.no_grad():
        skipped = adapter(x, SIGMA, cond, skip=skip)
        torch.testing.assert_close(adapt(pruned)(x, SIGMA, cond), skipped, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(adapt(fresh.eval())(x, SIGMA, cond), skipped, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(skipped, adapter(x, SIGMA, cond), atol=1e-4)  # skipping did something
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    assert adapter.num_blocks == len(keep) + len(skip)  # the wrapped model is untouched


@pytest.mark.parametrize("case", range(2), ids=["wan", "hunyuan"])
def test_pruned_model_lives_where_its_teacher_does(case):
    """Every tensor of the pruned copy, buffers outside the state dict too (Wan's rotary tables), on the
    teacher's device: a GPU teacher's student must not keep its rope on the CPU. 'meta' stands in for CUDA."""
    model = _cases()[case][0].to("meta")
    pruned = adapt(model).pruned_model([0, 1])
    assert {t.device.type for t in [*pruned.parameters(), *pruned.buffers()]} == {"meta"}


def _guided_cases():
    for variant in ("t2v", "i2v", "ti2v"):
        model = tiny_wan(variant, layers=6)
        x, cond = wan_inputs(model)
        sigma = torch.tensor([[0.0, 0.4, 0.4], [0.0, 0.9, 0.9]])[:, :x.shape[2]] if variant == "ti2v" else SIGMA
        yield variant, model, x, sigma, cond, null_like(cond)
    model = tiny_hunyuan(double=3, single=3)
    x, cond = hunyuan_inputs()
    yield "hunyuan", model, x, SIGMA, cond, hunyuan_inputs(seed=2)[1]  # another text mask: mask rows are sliced


@pytest.mark.parametrize("case", list(_guided_cases()), ids=lambda c: c[0])
def test_guided_triple_equals_three_calls_and_batches_the_prefix(case):
    _, model, x, sigma, cond, null = case
    adapter, skip = adapt(model), {2, 4}
    with torch.no_grad():
        separate = (adapter(x, sigma, cond, skip=skip), adapter(x, sigma, null, skip=skip), adapter(x, sigma, cond))
        adapter.block_evaluations = 0
        guided = guided_predictions(adapter, x, sigma, cond, null, skip)
    for got, want in zip(guided, separate):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(guided[0], guided[1], atol=1e-4)  # the null rows are not the cond rows
    # prefix 0-1 once for both rows, pruned path 3, 5, full path 2-5 on the cond rows: 2 + 2 + 4
    assert adapter.block_evaluations == 8


def test_out_of_range_skip_is_refused():
    adapter = adapt(tiny_wan("t2v", layers=3))
    x, cond = wan_inputs(adapter.model)
    with pytest.raises(ValueError, match="out of range"):
        adapter(x, SIGMA, cond, skip=[3])


def test_unsupported_model_is_refused():
    with pytest.raises(TypeError, match="not a supported DiT"):
        adapt(torch.nn.Linear(2, 2))
