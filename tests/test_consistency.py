"""Latent consistency distillation (sdkit.training.consistency) and its low-rank deltas (sdkit.nn.lowrank).

Oracles: the LoCon form computed with plain convolutions (down conv to r channels, 1×1 up conv); diffusers'
DDIMScheduler for the teacher's guided step and LCMScheduler for the boundary-condition consistency function; the
pseudo-Huber formula. Float32 tolerances: the paths differ in summation order (a UNet run at batch 2B against B,
a merged weight against two convolutions), each contributing a few ulps (1.2e-7) per layer through ~40 layers;
1e-4 relative leaves a 100× margin over what was measured (≤ 1e-6, 1 and 2 threads).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, LCMScheduler
from diffusers.utils import logging as diffusers_logging
from torch import nn

import sdkit
from sdkit.checkpoints import load
from sdkit.data.shapes import ShapesDataset
from sdkit.nn.lowrank import DeltaFileError, LowRankDelta, load_delta, save_delta
from sdkit.training.common import per_sample_randn, sample_generators
from sdkit.training.consistency import ConsistencyDistillationModule, ddim_grid
from sdkit.training.datamodule import collate

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.usefixtures("one_thread")]

SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
diffusers_logging.set_verbosity_error()   # LCMScheduler warns about one-timestep custom schedules: wanted here


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        return self.fc(self.point(self.conv(x)).mean((2, 3)))


def randomised(delta):
    with torch.no_grad():
        for p in delta.up:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return delta


def test_delta_is_the_locon_update_and_merges_and_unmerges():
    torch.manual_seed(0)
    net, x = Small(), torch.randn(2, 3, 6, 6)
    delta = LowRankDelta(net, rank=2)
    assert torch.equal(delta.run(net, x), net(x))              # up starts at zero: the identity, exactly
    randomised(delta)
    (d0, u0), (d1, u1), (d2, u2) = [(delta.down[i], delta.up[i]) for i in range(3)]
    # LoCon: a 3x3 conv to r channels, then a 1x1 conv back, added to the layer's output
    h = net.conv(x) + F.conv2d(F.conv2d(x, d0.view(2, 3, 3, 3), padding=1), u0.view(8, 2, 1, 1))
    h = net.point(h) + F.conv2d(F.conv2d(h, d1.view(2, 8, 1, 1)), u1.view(6, 2, 1, 1))
    h = h.mean((2, 3))
    expected = net.fc(h) + h @ d2.T @ u2.T
    assert rel(delta.run(net, x), expected) < 1e-5
    before = {k: v.clone() for k, v in net.state_dict().items()}
    delta.merge_into(net)
    assert rel(net(x), expected) < 1e-5
    delta.merge_into(net, sign=-1)
    assert all(torch.allclose(net.state_dict()[k], v, atol=1e-6) for k, v in before.items())


def test_delta_file_round_trip_and_refusals(tmp_path):
    torch.manual_seed(1)
    net = Small()
    delta = randomised(LowRankDelta(net, rank=4))
    path = save_delta(delta, net, tmp_path / "d.safetensors", {"base": "small"})
    loaded, meta = load_delta(net, path)
    assert meta["base"] == "small" and meta["rank"] == "4"
    for i in range(3):   # stored in float16: the factors come back rounded once
        assert torch.equal(loaded.down[i], delta.down[i].half().float())
        assert torch.equal(loaded.up[i], delta.up[i].half().float())
    other = Small()   # other base weights: refused, not merged silently
    with pytest.raises(DeltaFileError, match="other base weights"):
        load_delta(other, path)
    load_delta(other, path, check_base=False)
    wider = nn.Sequential(nn.Conv2d(3, 9, 3))
    with pytest.raises(DeltaFileError, match="do not match"):
        load_delta(wider, path, check_base=False)


def test_delta_from_a_fine_tune_is_its_truncated_svd():
    """A fine-tune whose change is exactly rank 2 per layer comes back exactly at rank 2; with a full-rank change
    added, rank 2 keeps the planted part and loses what Eckart–Young says: the tail singular values."""
    torch.manual_seed(2)
    base, x = Small(), torch.randn(2, 3, 6, 6)
    planted = randomised(LowRankDelta(base, rank=2, seed=3))
    tuned = planted.merge_into(copy.deepcopy(base))
    extracted = LowRankDelta.from_difference(base, tuned, rank=2)
    assert extracted.relative_error < 1e-6
    assert rel(extracted.run(base, x), tuned(x)) < 1e-5
    noise = {n: 1e-3 * torch.randn_like(p) for n, p in tuned.named_parameters() if n.endswith("weight")}
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            p.add_(noise.get(n, 0))
    extracted = LowRankDelta.from_difference(base, tuned, rank=2)
    lost = sum(float((torch.linalg.svdvals((planted.delta(i) + noise[f"{name}.weight"]).reshape(shape[0], -1)
                                           .double())[2:] ** 2).sum())
               for i, (name, shape) in enumerate(zip(planted.names, planted.shapes)))
    total = sum(float(((planted.delta(i) + noise[f"{name}.weight"]).double() ** 2).sum())
                for i, name in enumerate(planted.names))
    assert extracted.relative_error == pytest.approx((lost / total) ** 0.5, rel=1e-6)
    assert rel(extracted.run(base, x), planted.run(base, x)) < 0.05   # noise 1e-3 against updates ~0.1·|down|


@pytest.fixture(scope="module")
def module():
    return ConsistencyDistillationModule(teacher="tiny", rank=4, cache_text=True)


def batch(n=3):
    data = ShapesDataset(length=16, size=64, split="train", caption_style="varied", seed=4)
    items = [dict(data[i]) for i in (3, 7, 11)[:n]]
    return collate([{k: v for k, v in item.items() if k != "meta"} | {"index": i} for i, item in zip((3, 7, 11), items)])


def lcm_f(eps, t, x):
    """LCMScheduler's consistency function (its step's ``denoised``) at timestep t."""
    sched = LCMScheduler(**SD, clip_sample=False)
    sched.set_timesteps(timesteps=[int(t)])
    return sched.step(eps, int(t), x).denoised


def test_grid_is_lcms_ddim_solver():
    start, prev = ddim_grid(1000, 50)
    assert start[:3].tolist() == [19, 39, 59] and start[-1] == 999
    assert prev[:3].tolist() == [0, 19, 39] and torch.equal(prev[1:], start[:-1])


def test_teacher_step_and_boundary_match_diffusers(module):
    """The guided DDIM step == DDIMScheduler.step (50 steps: prev = t − 20, ᾱ₀ below 0); the consistency function
    == LCMScheduler.step(...).denoised."""
    b = batch()
    ldm = module.ldm
    cond, uncond = module.encode_text(b["caption"]), module.encode_text([""] * 3)
    t = torch.tensor([19, 499, 999])
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    ours = module.teacher_ddim_step(x, t, ddim_grid(1000, 50)[1][[0, 24, 49]], cond, uncond)
    ddim = DDIMScheduler(**SD, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(50)
    with torch.no_grad():
        for i in range(3):
            xi, ti = x[i:i + 1], t[i:i + 1].float()
            eps_c = ldm.apply_model(xi, ti, cond[i:i + 1])
            eps_u = ldm.apply_model(xi, ti, uncond[i:i + 1])
            eps = eps_u + 5.0 * (eps_c - eps_u)
            assert rel(ours[i:i + 1], ddim.step(eps, int(t[i]), xi).prev_sample) < 1e-4
            f = module.consistency(None, xi, t[i:i + 1], cond[i:i + 1])
            assert rel(f, lcm_f(eps_c, t[i], xi)) < 1e-4


def test_distillation_loss_by_hand_and_one_step_trains_only_the_delta(module):
    """At the start student = target = teacher, so the loss is the teacher's own inconsistency across one guided
    step, recomputed here from the same per-item draws with diffusers' schedulers; one optimizer step moves the
    student, the target by 1 − 0.95 of it, and no teacher weight."""
    b = batch()
    loss = module.distillation_loss(b, 5, "train")
    gens = sample_generators(module.seed, 5, b["index"])
    n = torch.stack([torch.randint(0, 50, (), generator=g) for g in gens])
    z = module.latents(module.posterior_moments(b, "train"), gens)
    noise = per_sample_randn(gens, z.shape[1:], z.device)
    ac = module.ldm.alphas_cumprod
    t = 20 * n + 19
    x = ac[t].sqrt().view(-1, 1, 1, 1) * z + (1 - ac[t]).sqrt().view(-1, 1, 1, 1) * noise
    cond, uncond = module.encode_text(b["caption"]), module.encode_text([""] * 3)
    ddim = DDIMScheduler(**SD, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(50)
    terms = []
    with torch.no_grad():
        for i in range(3):
            xi, ti, c, u = x[i:i + 1], int(t[i]), cond[i:i + 1], uncond[i:i + 1]
            eps_c, eps_u = module.ldm.apply_model(xi, t[i:i + 1].float(), c), module.ldm.apply_model(xi, t[i:i + 1].float(), u)
            x_prev = ddim.step(eps_u + 5.0 * (eps_c - eps_u), ti, xi).prev_sample
            tp = max(ti - 20, 0)
            pred = lcm_f(eps_c, ti, xi)
            target = lcm_f(module.ldm.apply_model(x_prev, torch.tensor([float(tp)]), c), tp, x_prev)
            terms.append(torch.sqrt((pred - target) ** 2 + 1e-6) - 1e-3)
    assert loss.item() == pytest.approx(torch.cat(terms).mean().item(), rel=1e-4)

    teacher = {k: v.clone() for k, v in module.ldm.state_dict().items()}
    optimizer = module.configure_optimizers()
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in module.ldm.parameters())
    assert sum(float(p.grad.abs().sum()) for p in module.student.up) > 0
    optimizer.step()
    module.target.lerp_towards(module.student, 1 - module.ema_decay)
    for s, tg in zip(module.student.up, module.target.up):
        assert torch.allclose(tg, 0.05 * s, rtol=1e-6, atol=0)
    assert all(torch.equal(v, teacher[k]) for k, v in module.ldm.state_dict().items())


def test_exported_delta_merges_into_the_shipped_model(module, tmp_path, monkeypatch):
    """The file a run ships, as data/tiny-lcm.safetensors, makes load_model("tiny-lcm") the target network: the
    same ε as the delta run through functional_call over the teacher (its factors as stored, float16)."""
    randomised(module.target)
    path = module.export(tmp_path / "tiny-lcm.safetensors")
    n = module.target.numel()          # float16 factors and a header (rank 4 here: 1.3 MB; rank 16: 5.0 MB)
    assert 2 * n < path.stat().st_size < 2 * n + 200_000
    (tmp_path / "tiny.safetensors").symlink_to(load.data_dir() / "tiny.safetensors")
    monkeypatch.setenv("SDKIT_DATA", str(tmp_path))
    model = sdkit.load_model("tiny-lcm")
    assert model.delta_meta["sampler"] == "lcm" and model.delta_meta["base"] == "tiny"
    delta, _ = load_delta(module.unet, path)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([999.0, 259.0])
    cond = module.encode_text(["a red circle", "a blue square"])
    with torch.no_grad():
        expected = delta.run(module.unet, x, t, context=cond)
        merged = model.apply_model(x, t, cond)
    assert rel(merged, expected) < 1e-4
    assert rel(merged, module.ldm.apply_model(x, t, cond)) > 1e-3      # the delta did change the model
    path.unlink()
    with pytest.raises(FileNotFoundError, match="low-rank delta 'tiny-lcm.safetensors'.*sdkit train -b recipes/lcm"):
        sdkit.load_model("tiny-lcm")
