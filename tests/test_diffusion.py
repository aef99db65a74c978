"""LatentDiffusion: the full SD v1 state-dict layout, the forward process, conditioning routes, EMA, the loss."""
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler

from sdkit.config import instantiate_from_config, load_config
from sdkit.diffusion import DiffusionWrapper, LatentDiffusion
from sdkit.ema import LitEma

KEYS_FILE = Path(__file__).parent / "fixtures" / "sd_v1_checkpoint_keys.txt"


def reference_keys() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in KEYS_FILE.read_text().splitlines():
        name, shape = line.split(" ", 1)
        out[name] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


def test_sd_v1_state_dict_equals_the_reference_key_list():
    cfg = load_config("sd-v1-inference").model
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = reference_keys()
    assert len(ref) == 1143
    assert sorted(set(ref) - set(ours)) == [] and sorted(set(ours) - set(ref)) == []
    assert {k: v for k, v in ours.items() if ref[k] != v} == {}
    assert model.scale_factor == 0.18215 and "scale_factor" not in ours  # an attribute, as in CompVis


def test_use_ema_adds_compvis_named_buffers():
    cfg = load_config("sd-v1-inference", ["model.params.use_ema=true"]).model
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    sd = model.state_dict()
    ema = [k for k in sd if k.startswith("model_ema.")]
    assert len(ema) == 686 + 2
    assert "model_ema.diffusion_modelinput_blocks00weight" in sd and "model_ema.decay" in sd
    assert sd["model_ema.diffusion_modeloutput_blocks111transformer_blocks0attn2to_kweight"].shape == (320, 768)


def _schedule_model(**kw):
    """A LatentDiffusion with identity stages: enough to test the schedule-side methods."""
    cfg = dict(unet_config={"target": "torch.nn.Identity"}, first_stage_config={"target": "torch.nn.Identity"},
               cond_stage_config="__is_unconditional__", linear_start=0.00085, linear_end=0.012, use_ema=False)
    cfg.update(kw)
    return LatentDiffusion(**cfg)


def test_q_sample_equals_diffusers_add_noise():
    model = _schedule_model()
    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    # √ᾱ·x0 + √(1−ᾱ)·ε elementwise: each coefficient (sqrt vs **0.5), product and the sum round once (≤ u = 2⁻²⁴
    # of |x0|, |ε| ≤ 5), so ≤ 4u·(√ᾱ|x0| + √(1−ᾱ)|ε|) ≤ 4u·5·√2 ≈ 1.7e-6 where the two terms cancel
    torch.testing.assert_close(model.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(model.alphas_cumprod, ref.alphas_cumprod)


def test_predict_start_inverts_q_sample_and_posterior_closed_form():
    model = _schedule_model()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([5, 300, 900])
    xt = model.q_sample(x0, t, noise)
    torch.testing.assert_close(model.predict_start_from_noise(xt, t, noise), x0, rtol=1e-4, atol=1e-4)
    mean, var, _ = model.q_posterior(x0, xt, t)
    coef1, coef2 = model.posterior_mean_coef1[t], model.posterior_mean_coef2[t]
    ac, acp, b = model.alphas_cumprod[t], model.alphas_cumprod_prev[t], model.betas[t]
    torch.testing.assert_close(coef1, acp.sqrt() * b / (1 - ac))
    torch.testing.assert_close(mean, coef1.view(-1, 1, 1, 1) * x0 + coef2.view(-1, 1, 1, 1) * xt)
    torch.testing.assert_close(var.flatten(), model.posterior_variance[t])


class _Recorder(torch.nn.Module):
    """A stand-in UNet that records how it was called."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, t, context=None, y=None):
        self.calls.append({"x": x, "context": context, "y": y})
        return x[:, :2] * self.w


@pytest.mark.parametrize("key", ["concat", "crossattn", "hybrid", "adm"])
def test_conditioning_routes(key):
    wrapper = DiffusionWrapper({"target": "torch.nn.Identity"}, key)
    wrapper.diffusion_model = _Recorder()
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([1, 2])
    cc, ca = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 8)
    wrapper(x, t, c_concat=[cc], c_crossattn=[ca])
    call = wrapper.diffusion_model.calls[-1]
    if key in ("concat", "hybrid"):
        torch.testing.assert_close(call["x"], torch.cat([x, cc], 1))
    else:
        assert call["x"] is x
    if key in ("crossattn", "hybrid"):
        torch.testing.assert_close(call["context"], ca)
    if key == "adm":
        assert call["y"] is ca
    with pytest.raises(ValueError, match="needs"):
        wrapper(x, t)


def test_unknown_conditioning_key_is_refused():
    with pytest.raises(ValueError, match="conditioning_key"):
        DiffusionWrapper({"target": "torch.nn.Identity"}, "film")


def test_ema_scope_swaps_and_restores_and_update_rule():
    model = _schedule_model(conditioning_key="crossattn")
    model.model.diffusion_model = _Recorder()
    model.use_ema, model.model_ema = True, LitEma(model.model)
    w = model.model.diffusion_model.w
    with torch.no_grad():
        w.fill_(3.0)
    model.model_ema(model.model)  # n=1: decay = min(0.9999, 2/11)
    d = 2 / 11
    expected = 1.0 - (1 - d) * (1.0 - 3.0)
    assert model.model_ema.diffusion_modelw.item() == pytest.approx(expected)
    with model.ema_scope():
        assert w.item() == pytest.approx(expected)
    assert w.item() == 3.0


def test_loss_is_eps_mse_at_logvar_zero():
    model = _schedule_model(conditioning_key="crossattn")
    model.model.diffusion_model = _Recorder()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    t = torch.tensor([100, 700])
    loss, logs = model.p_losses(x0, torch.randn(2, 3, 8), t, noise=noise)
    xt = model.q_sample(x0, t, noise)
    # the mean of 64 squares summed in another order: ≤ 64·u = 3.8e-6 relative for any order (u = 2⁻²⁴)
    assert loss.item() == pytest.approx(((xt - noise) ** 2).mean().item(), rel=1e-5)
    assert "train/loss_simple" in logs


def test_first_stage_frozen_and_stays_in_eval():
    model = _schedule_model(first_stage_config={"target": "torch.nn.Linear", "params": {"in_features": 2,
                                                                                          "out_features": 2}})
    model.train()
    assert not model.first_stage_model.training
    assert not any(p.requires_grad for p in model.first_stage_model.parameters())
