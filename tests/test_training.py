"""The training harness: exact resume, DDP equivalence, crash/signal checkpoints, atomic writes, LR scaling,
conditioning dropout, CompVis checkpoint keys, the autoencoder losses, and the full-size sd-v1-train config.

Runs use the bundled tiny-test model (8×8 images → 4×4 latents) through ``sdkit train`` (in this process where
possible, as subprocesses where a process must die or fork ranks). Each comparison is against something the
test did not compute the same way: an unbroken run, a single-process run, a closed-form value.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import sdkit
from sdkit.checkpoints import CheckpointError
from sdkit.training import run as run_mod
from sdkit.training.callbacks import AtomicCheckpointIO, check_checkpoint_file
from sdkit.training.datamodule import ResumableBatchSampler, ShardedIterable, collate

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).parent / "fixtures"  # training_helpers.py: callbacks that kill/signal/raise at a step


QUIET = {"lightning": {"trainer": {"limit_val_batches": 0},  # for runs that test something else
                       "callbacks": {"image_logger": {"params": {"disabled": True}}}}}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The test models are tiny: one thread avoids OpenMP barrier spinning on a shared 2-core machine, which made
    these runs 10-20× slower when other programs were busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_config(folder: Path, *, length=24, batch_size=4, max_steps=8, every=3, val_every=4, extra=None) -> Path:
    """Data + lightning config over the bundled tiny-test model: 8×8 procedural shapes, EMA and 10% dropout on."""
    cfg = {
        "model": {"params": {"use_ema": True, "ucg_probability": 0.1, "first_stage_key": "image",
                             "cond_stage_key": "caption", "image_size": 4},
                  "training": {"cache_latents": True, "cache_text": True}},
        "data": {"target": "sdkit.training.DataModule",
                 "params": {"batch_size": batch_size, "num_workers": 0,
                            "train": {"target": "sdkit.data.shapes.ShapesDataset",
                                      "params": {"length": length, "size": 8}},
                            "validation": {"target": "sdkit.data.shapes.ShapesDataset",
                                           "params": {"length": 4, "size": 8, "split": "validation"}}}},
        "lightning": {
            "trainer": {"max_steps": max_steps, "accelerator": "cpu", "val_check_interval": val_every,
                        "check_val_every_n_epoch": None, "log_every_n_steps": 1, "enable_model_summary": False,
                        "enable_progress_bar": False, "num_sanity_val_steps": 0},
            "callbacks": {"image_logger": {"params": {"batch_frequency": 5, "max_images": 2,
                                                      "increase_log_steps": False,
                                                      "log_images_kwargs": {"ddim_steps": 2}}},
                          "last_checkpoint": {"params": {"every_n_train_steps": every}}}},
    }
    cfg = OmegaConf.merge(cfg, extra or {})
    path = folder / "test-data.yaml"
    OmegaConf.save(cfg, path)
    return path


def train(folder: Path, config: Path, name: str, *args: str) -> Path:
    """One `sdkit train` in this process; returns the run folder."""
    logdir = folder / "logs"
    assert run_mod.main(["-b", "tiny-test", "-b", str(config), "--name", name, "-l", str(logdir), *args]) == 0
    return run_folder(logdir, name)


def train_subprocess(folder: Path, config: Path, name: str, *args: str, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sdkit.training.run", "-b", "tiny-test", "-b", str(config), "--name", name,
           "-l", str(folder / "logs"), *args]
    proc = subprocess.run(cmd, env=env, cwd=folder, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_folder(logdir: Path, name: str) -> Path:
    (folder,) = [p for p in logdir.iterdir() if p.name.endswith("_" + name)]
    return folder


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())


# ============================================================================================ resume & signals


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unbroken")
    config = write_config(folder, **RESUME_RUN)
    return folder, config, train(folder, config, "unbroken")


# 6 optimizer steps of 2 accumulated batches: 12 batches, 6 per epoch; last.ckpt every 2 steps; validation
# every 4 batches and sample images at step 5 run inside the span that the resumed run repeats
RESUME_RUN = dict(max_steps=6, every=2, extra={"lightning": {"trainer": {"accumulate_grad_batches": 2}}})


def test_sigkill_then_resume_equals_unbroken_run(unbroken, tmp_path, capsys):
    """Killed with SIGKILL after step 5 (last.ckpt from step 4 = batch 8, mid-epoch 2), resumed: the final
    weights, EMA, AdamW moments and data position equal the unbroken run's. The resumed process reads the
    latent/text caches written with the step-4 checkpoint instead of encoding the data again."""
    _, _, reference = unbroken
    config = write_config(tmp_path, **RESUME_RUN)
    proc = train_subprocess(tmp_path, config, "killed", "lightning.callbacks.killer.target=training_helpers.KillAt",
                            "lightning.callbacks.killer.params.step=5", check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed = run_folder(tmp_path / "logs", "killed")
    assert load(killed / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert (killed / "cache" / "encodings-rank0.pt").is_file()
    capsys.readouterr()
    run_mod.main(["--resume", str(killed), "lightning.callbacks.killer=null"])
    out = capsys.readouterr().out
    assert "28 latents" in out, out  # all 24 training and 4 validation items were encoded before step 4
    a, b = load(reference / "checkpoints" / "last.ckpt"), load(killed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert a["DataModule"] == b["DataModule"] == {"batches_consumed": 12, "stream_start": 0}
    diff = max_diff(a["state_dict"], b["state_dict"])
    moments = max(max_diff(a["optimizer_states"][0]["state"][i], b["optimizer_states"][0]["state"][i])
                  for i in a["optimizer_states"][0]["state"])
    print(f"resumed vs unbroken: max |Δweight| {diff:.3g}, max |ΔAdamW state| {moments:.3g}")
    assert diff <= 1e-6 and moments <= 1e-6


def test_encoding_cache_round_trip_and_fingerprint(tmp_path):
    """The cache file gives back exactly what was stored, and only to a run with the same data and encoders."""
    from sdkit.training import encoding_cache

    first_stage, text_encoder = torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(4, 4)
    key = encoding_cache.fingerprint("data: a", first_stage, text_encoder, torch.float16)
    latents = {("train", i): torch.randn(8, 2, 2) for i in range(5)}
    texts = {f"caption {i}": torch.randn(3, 4).half() for i in range(3)}
    path = tmp_path / "cache" / "encodings-rank0.pt"
    encoding_cache.save(path, key, latents, texts)
    got_latents, got_texts = encoding_cache.load(path, key)
    assert got_latents.keys() == latents.keys() and got_texts.keys() == texts.keys()
    assert all(torch.equal(got_latents[k], v) for k, v in latents.items())
    assert all(torch.equal(got_texts[k], v) and got_texts[k].dtype == torch.float16 for k, v in texts.items())
    with torch.no_grad():
        first_stage.weight[0, 0, 0, 0] += 1e-3
    for other in (encoding_cache.fingerprint("data: a", first_stage, text_encoder, torch.float16),
                  encoding_cache.fingerprint("data: b", torch.nn.Conv2d(3, 8, 3), text_encoder, torch.float16),
                  key[::-1]):
        assert other != key and encoding_cache.load(path, other) is None
    path.write_bytes(b"not a torch file")
    assert encoding_cache.load(path, key) is None


def test_checkpoint_keys_are_compvis_and_load_with_sdkit(unbroken):
    _, _, folder = unbroken
    ckpt = folder / "checkpoints" / "last.ckpt"
    state = load(ckpt)["state_dict"]
    unet = [k for k in state if k.startswith("model.diffusion_model.")]
    assert unet and not any(k.startswith("ldm.") for k in state)
    for k in unet:  # LitEma: model_ema.<name under model, dots removed>
        assert "model_ema." + k[len("model."):].replace(".", "") in state
    assert int(state["model_ema.num_updates"]) == 6 and float(state["model_ema.decay"]) == pytest.approx(0.9999)
    (config,) = (folder / "configs").glob("*-project.yaml")  # the run folder's merged config builds the model
    model = sdkit.load_model(str(config), str(ckpt))  # EMA weights by default
    weight = model.model.diffusion_model.input_blocks[0][0].weight
    assert torch.equal(weight, state["model_ema.diffusion_modelinput_blocks00weight"])
    raw = sdkit.load_model(str(config), str(ckpt), use_ema=False).model.diffusion_model.input_blocks[0][0].weight
    assert torch.equal(raw, state["model.diffusion_model.input_blocks.0.0.weight"])
    assert list((folder / "images" / "train").glob("grid_gs-000005_*.png"))  # the image logger ran


def test_truncated_checkpoint_is_refused_and_writes_are_atomic(unbroken, tmp_path, monkeypatch):
    _, _, folder = unbroken
    last = folder / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        run_mod.main(["--resume", str(truncated)])

    # a write that dies half-way (disk full, a kill) leaves the previous checkpoint untouched
    before = last.read_bytes()

    def dying_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="No space"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, last)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir() if p.name.startswith(".")) == []  # no temp file left
    check_checkpoint_file(last)


def test_sigusr1_writes_a_checkpoint_and_training_goes_on(tmp_path):
    config = write_config(tmp_path, max_steps=5, every=100, extra=OmegaConf.merge(QUIET, {"lightning": {"callbacks": {
        "signal": {"target": "training_helpers.SignalAt", "params": {"step": 3}},
        "resilience": {"params": {"save_on_train_end": False}}}}}))
    sys.path.insert(0, str(HELPERS))
    try:
        folder = train(tmp_path, config, "usr1")
    finally:
        sys.path.remove(str(HELPERS))
    ckpt = load(folder / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] in (3, 4)  # served at the next optimizer-step boundary
    (project,) = (folder / "configs").glob("*-project.yaml")
    sdkit.load_model(str(project), str(folder / "checkpoints" / "last.ckpt"))


def test_exception_writes_a_checkpoint_before_propagating(tmp_path):
    config = write_config(tmp_path, max_steps=6, every=100, extra=OmegaConf.merge(QUIET, {"lightning": {"callbacks": {
        "failure": {"target": "training_helpers.RaiseAt", "params": {"step": 3}}}}}))
    sys.path.insert(0, str(HELPERS))
    try:
        with pytest.raises(RuntimeError, match="test failure at step 3"):
            train(tmp_path, config, "crash")
    finally:
        sys.path.remove(str(HELPERS))
    folder = run_folder(tmp_path / "logs", "crash")
    ckpt = folder / "checkpoints" / "on_exception.ckpt"
    assert load(ckpt)["global_step"] == 3
    (project,) = (folder / "configs").glob("*-project.yaml")
    sdkit.load_model(str(project), str(ckpt))


# ============================================================================================ distributed


def test_ddp_two_cpu_processes_match_one_process(tmp_path):
    """2 ranks × batch 2 (gloo) against 1 process × batch 4, 3 AdamW steps. AdamW eps is raised to 1e-4:
    biases followed by a GroupNorm have an analytically zero gradient, and Adam would turn its rounding noise
    (1e-10) into ±lr steps; real gradients (1e-4 and up) are still normalised as usual."""
    common = OmegaConf.merge(QUIET, {"model": {"training": {"eps": 1.0e-4}}})
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one_cfg = write_config(tmp_path / "one", batch_size=4, max_steps=3, every=100, extra=common)
    one = train(tmp_path, one_cfg, "one")
    two_cfg = write_config(tmp_path / "two", batch_size=2, max_steps=3, every=100, extra=OmegaConf.merge(
        common, {"lightning": {"trainer": {"devices": 2, "strategy": "ddp"}}}))
    train_subprocess(tmp_path, two_cfg, "two")
    a, b = load(one / "checkpoints" / "last.ckpt"), load(run_folder(tmp_path / "logs", "two") / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 3
    diff = max_diff(a["state_dict"], b["state_dict"])
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    grads = max(max_diff({"m": state_a[i]["exp_avg"]}, {"m": state_b[i]["exp_avg"]}) for i in state_a)
    scale = max(state_a[i]["exp_avg"].abs().max().item() for i in state_a)
    print(f"DDP vs single process: max |Δweight| {diff:.3g}, max |Δexp_avg| {grads:.3g} "
          f"(relative to max |exp_avg| {scale:.3g}: {grads / scale:.3g})")
    # The gradient is a mean over batch and pixels (up to ~1e4 float32 terms) summed in another order by the
    # all-reduce: a relative error of order sqrt(n)·u ≈ 1e-5 of the gradient's scale (n·u ≈ 6e-4 at worst),
    # carried into exp_avg over 3 steps. Weights move by lr·(Adam step) and differ by far less.
    assert diff <= 1e-6 and grads <= 1e-4 * scale


def test_batch_order_is_shared_by_ranks_and_resumable():
    """Ranks' batches together are the single-process batch; iteration resumes at the consumed position."""
    single = ResumableBatchSampler(20, 4, seed=5)
    ranks = [ResumableBatchSampler(20, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    assert len(single) == len(ranks[0]) == 5
    for got, (r0, r1) in zip(single, zip(*ranks)):
        assert got == r0 + r1
    for consumed in (0, 3, 5, 12):  # epoch 0 start, mid epoch 0, epoch 1 start, mid epoch 2
        resumed = ResumableBatchSampler(20, 4, seed=5, position=lambda: consumed)
        epoch, start = divmod(consumed, 5)
        full = list(ResumableBatchSampler(20, 4, seed=5, position=lambda: epoch * 5))
        assert list(resumed) == full[start:]
    assert list(ResumableBatchSampler(20, 4, seed=5, position=lambda: 5)) != list(single)  # a new epoch order


def test_iterable_sharding_is_independent_of_workers():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter({"x": torch.tensor(float(i)), "caption": str(i)} for i in range(22))

    def batches(workers: int, rank=0, world=1, skip=0):
        ds = ShardedIterable(Stream(), 3, rank, world)
        ds.skip_batches = skip
        loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=workers, collate_fn=collate)
        return [b["index"].tolist() for b in loader]

    assert batches(0) == batches(2) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14],
                                        [15, 16, 17], [18, 19, 20], [21]]
    assert batches(0, rank=1, world=2) == [[1, 3, 5], [7, 9, 11], [13, 15, 17], [19, 21]]
    assert batches(2, rank=1, world=2, skip=2) == [[13, 15, 17], [19, 21]]


# ============================================================================================ rules


def test_learning_rate_scaling_rule():
    cfg = OmegaConf.create({"model": {"base_learning_rate": 1e-4}, "data": {"params": {"batch_size": 4}},
                            "lightning": {"trainer": {"accumulate_grad_batches": 3}}})
    trainer = types.SimpleNamespace(num_devices=2, num_nodes=1)
    assert run_mod.scaled_learning_rate(cfg, trainer, True) == pytest.approx(3 * 2 * 4 * 1e-4)
    assert run_mod.scaled_learning_rate(cfg, types.SimpleNamespace(num_devices=8, num_nodes=4), True) \
        == pytest.approx(3 * 32 * 4 * 1e-4)
    assert run_mod.scaled_learning_rate(cfg, trainer, False) == pytest.approx(1e-4)


def test_conditioning_dropout_rate_and_empty_prompt():
    from sdkit.training.diffusion import LatentDiffusionModule

    cfg = sdkit.load_config("tiny-test")
    module = LatentDiffusionModule(OmegaConf.to_container(cfg.model), seed=3)
    module.ldm.ucg_probability = 0.1
    n = 1000
    batch = {"jpg": torch.zeros(n, 3, 8, 8), "txt": [f"a red circle {i % 7}" for i in range(n)],
             "index": torch.arange(n)}
    with torch.no_grad():
        _, _, drop = module.shared_step(batch, step=11, split="train", ucg=0.1)
        rate = sum(drop) / n
        assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n), rate  # binomial, 4 sigma
        small = {"txt": batch["txt"][:40], "index": batch["index"][:40]}
        cond = module.conditioning(small, drop[:40])
        empty = module.ldm.get_learned_conditioning([""])[0]
        plain = module.ldm.get_learned_conditioning(small["txt"])
    assert any(drop[:40]) and not all(drop[:40])
    for i, dropped in enumerate(drop[:40]):
        assert torch.equal(cond[i], empty if dropped else plain[i])
    # the draws are a function of (seed, step, index): the same items give the same coins in any batch
    with torch.no_grad():
        again = module.shared_step({k: v[600:] for k, v in batch.items()}, step=11, split="train", ucg=0.1)[2]
    assert again == drop[600:]


def test_frozen_encoders_run_in_float32_under_bf16_mixed_precision():
    """Under bf16-mixed the cached latents and text states equal the float32 encoders' (as at inference)."""
    from sdkit.training.diffusion import LatentDiffusionModule

    cfg = sdkit.load_config("tiny-test")
    module = LatentDiffusionModule(OmegaConf.to_container(cfg.model), seed=3, cache_latents=True,
                                   cache_text=True, cache_dtype="float32")
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    captions = ["a red circle", "two blue squares at the top", ""]
    batch = {"jpg": x.permute(0, 2, 3, 1), "txt": captions, "index": torch.arange(3)}
    with torch.no_grad():
        want_z = module.ldm.encode_first_stage(x).parameters
        want_c = module.ldm.get_learned_conditioning(captions)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = module.ldm.encode_first_stage(x).parameters   # what an unguarded encoder would cache
            got_z = module.posterior_moments(batch, "train")
            got_c = module.encode_text(captions)
    assert not torch.allclose(rounded.float(), want_z, atol=1e-4), "autocast had no effect: test is vacuous"
    assert got_z.dtype == torch.float32 and torch.allclose(got_z, want_z, atol=1e-6)
    assert torch.allclose(got_c, want_c, atol=1e-6)


def test_init_from_continues_a_model_and_can_grow_it(tmp_path):
    """init_from loads every weight of a file; with init_strict=False a model with cross-attention at one more
    resolution starts from the file and, its new blocks being identities, predicts exactly the same noise."""
    from safetensors.torch import save_file

    from sdkit.training.diffusion import LatentDiffusionModule

    def model_config(attention_resolutions):
        cfg = OmegaConf.to_container(sdkit.load_config("tiny-test").model)
        cfg["params"]["unet_config"]["params"]["attention_resolutions"] = attention_resolutions
        return cfg

    torch.manual_seed(0)
    trained = LatentDiffusionModule(model_config([2]), seed=3)
    with torch.no_grad():   # move every weight off its initial value, zero-initialised ones included
        for p in trained.ldm.model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    file = tmp_path / "stage.safetensors"
    save_file({k: v.contiguous() for k, v in trained.ldm.state_dict().items()}, str(file))

    same = LatentDiffusionModule(model_config([2]), seed=4, init_from=str(file), init_use_ema=False)
    assert max_diff(same.ldm.model.state_dict(), trained.ldm.model.state_dict()) == 0.0
    with pytest.raises(CheckpointError, match="not in the checkpoint"):
        LatentDiffusionModule(model_config([2, 1]), seed=4, init_from=str(file), init_use_ema=False)
    with pytest.warns(UserWarning, match="keep their initial values"):
        grown = LatentDiffusionModule(model_config([2, 1]), seed=4, init_from=str(file), init_use_ema=False,
                                      init_strict=False)
    new = [k for k in grown.ldm.model.state_dict() if k not in trained.ldm.model.state_dict()]
    assert new and all(".transformer_blocks." in k or ".proj_" in k or ".norm." in k for k in new), new

    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    context = torch.randn(2, 77, model_config([2])["params"]["unet_config"]["params"]["context_dim"])
    with torch.no_grad():
        want = trained.ldm.apply_model(x, t, context)
        got = grown.ldm.apply_model(x, t, context)
        grown.ldm.model.diffusion_model.input_blocks[1][1].proj_out.weight.add_(0.1)   # a non-identity block
        moved = grown.ldm.apply_model(x, t, context)
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(moved, want, atol=1e-3), "the new attention block is not in the forward pass"


# ============================================================================================ losses


def test_discriminator_losses_and_adaptive_weight():
    from sdkit.nn.losses import LPIPSWithDiscriminator, NLayerDiscriminator, hinge_d_loss, vanilla_d_loss

    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3))
    softplus = lambda x: math.log1p(math.exp(x))
    assert vanilla_d_loss(real, fake).item() == pytest.approx(
        0.5 * (sum(softplus(-r) for r in real.tolist()) / 3 + sum(softplus(f) for f in fake.tolist()) / 3))
    disc = NLayerDiscriminator(3, 64, 3)
    assert disc(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)  # pix2pix's 70×70 PatchGAN
    assert "main.0.weight" in disc.state_dict() and "main.2.weight" in disc.state_dict()

    loss = LPIPSWithDiscriminator(disc_start=5, kl_weight=1e-6, disc_weight=0.5, perceptual_loss="none")
    last = torch.nn.Parameter(torch.randn(3, 3))
    x = torch.randn(2, 3, 32, 32)
    rec = torch.einsum("oc,bchw->bohw", last, x)
    from sdkit.nn.distributions import DiagonalGaussianDistribution
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 2, 2))
    before, log = loss(x, rec, posterior, 0, global_step=4, last_layer=last)
    nll = (x - rec).abs().sum() / 2
    assert before.item() == pytest.approx(nll.item() + 1e-6 * (posterior.kl().sum() / 2).item(), rel=1e-5)
    assert log["train/disc_factor"] == 0
    after, log = loss(x, rec, posterior, 0, global_step=5, last_layer=last)
    g = -loss.discriminator(rec).mean()
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    weight = 0.5 * torch.clamp(gn / (gg + 1e-4), 0, 1e4)
    assert log["train/d_weight"].item() == pytest.approx(weight.item(), rel=1e-5)
    assert after.item() == pytest.approx(before.item() + weight.item() * g.item(), rel=1e-5)


# ============================================================================================ full size


@pytest.mark.slow
def test_sd_v1_train_config_builds_full_size_and_steps_on_meta():
    """The 860M UNet of sd-v1-train on the meta device: one AdamW step with the warm-up LR, EMA update."""
    from sdkit.training.run import build_module

    cfg = sdkit.load_config("sd-v1-train", ["model.params.cond_stage_config.params.pretrained=false"])
    assert cfg.scale_lr is False and cfg.lightning.trainer.precision == "bf16-mixed"
    assert cfg.data.params.batch_size * cfg.lightning.trainer.devices * cfg.lightning.trainer.num_nodes \
        * cfg.lightning.trainer.accumulate_grad_batches == 2048
    with torch.device("meta"):
        module = build_module(cfg, learning_rate=1e-4, seed=0)
    module.to("meta")
    # meta tensors have no values: give the EMA counters real ones so the decay warm-up can be computed
    module.ldm.model_ema.decay = torch.tensor(0.9999)
    module.ldm.model_ema.num_updates = torch.tensor(0, dtype=torch.int)
    expected = 0
    for line in (HELPERS / "sd_v1_checkpoint_keys.txt").read_text().splitlines():
        key, shape = line.split(" ", 1)
        if key.startswith("model.diffusion_model."):
            expected += math.prod(int(s) for s in shape.strip("(),").split(",") if s.strip())
    assert sum(p.numel() for p in module.ldm.model.parameters()) == expected == 859_520_964
    assert all(m.use_checkpoint for m in module.ldm.model.modules() if hasattr(m, "use_checkpoint"))
    opt = module.configure_optimizers()
    optimizer, scheduler = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    assert type(optimizer).__name__ == "AdamW" and opt["lr_scheduler"]["interval"] == "step"
    module.train()
    batch = {"image": torch.zeros(2, 3, 64, 64), "caption": ["a photo of a cat", ""], "index": torch.arange(2)}
    loss = module.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is not None for p in module.trainable_parameters())
    optimizer.step()
    scheduler.step()
    module.ldm.model_ema(module.ldm.model)
    assert len(optimizer.state) == len(module.trainable_parameters())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 * (1e-6 + (1 - 1e-6) / 10000))
    assert int(module.ldm.model_ema.num_updates) == 1


# ============================================================================================ other models


def _first_stage_config(folder: Path, kind: str, disc_start: int, max_steps: int) -> Path:
    dd = {"double_z": kind == "kl", "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    loss = {"disc_start": disc_start, "disc_num_layers": 2, "disc_ndf": 8, "perceptual_loss": "gradient"}
    if kind == "kl":
        model = {"target": "sdkit.nn.autoencoder.AutoencoderKL",
                 "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": dd,
                            "lossconfig": {"target": "sdkit.nn.losses.LPIPSWithDiscriminator",
                                           "params": {**loss, "kl_weight": 1e-6}}}}
    else:
        model = {"target": "sdkit.nn.autoencoder.VQModel",
                 "params": {"n_embed": 16, "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": dd,
                            "lossconfig": {"target": "sdkit.nn.losses.VQLPIPSWithDiscriminator", "params": loss}}}
    cfg = OmegaConf.merge(OmegaConf.load(write_config(folder, length=8, batch_size=2, max_steps=max_steps,
                                                      every=100, extra=QUIET)),
                          {"data": {"params": {"train": {"params": {"size": 16}}}}})
    cfg.model = {"base_learning_rate": 1e-4, **model}
    path = folder / f"{kind}.yaml"
    OmegaConf.save(cfg, path)
    return path


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_autoencoder_training_two_optimizers_and_disc_start(tmp_path, kind):
    """Before disc_start only the autoencoder learns; after it the discriminator does too. Lightning counts the
    two optimizers' steps: max_steps 4 = 2 batches."""
    import lightning as L

    from sdkit.training.run import build_module

    def trained(max_steps: int, disc_start: int) -> dict:
        folder = tmp_path / f"{max_steps}-{disc_start}"
        folder.mkdir()
        config = _first_stage_config(folder, kind, disc_start, max_steps)
        assert run_mod.main(["-b", str(config), "--name", "ae", "-l", str(folder / "logs")]) == 0
        ckpt = load(run_folder(folder / "logs", "ae") / "checkpoints" / "last.ckpt")
        assert ckpt["sdkit_ae_steps"] == max_steps // 2
        return ckpt["state_dict"]

    config = OmegaConf.load(_first_stage_config(tmp_path, kind, 0, 4))
    L.seed_everything(23)  # what `sdkit train` does before building the model: the same initial weights
    initial = build_module(config, 1e-4, 23).autoencoder.state_dict()
    on = trained(4, disc_start=1)
    assert not any(k.startswith("autoencoder.") for k in on)
    disc = [k for k in initial if k.startswith("loss.discriminator.") and "weight" in k]
    assert disc and any(not torch.equal(on[k], initial[k]) for k in disc)
    assert not torch.equal(on["decoder.conv_out.weight"], initial["decoder.conv_out.weight"])
    if kind == "vq":
        assert not torch.equal(on["quantize.embedding.weight"], initial["quantize.embedding.weight"])
    else:  # with the discriminator still off, only the autoencoder moves
        off = trained(4, disc_start=5)
        assert all(torch.equal(off[k], initial[k]) for k in disc)
        assert not torch.equal(off["decoder.conv_out.weight"], initial["decoder.conv_out.weight"])


def test_small_clip_learns_to_match_captions(tmp_path):
    from sdkit.training.clip import contrastive_loss

    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 5.0], [0.0, 5.0, 5.0]])
    # items 1 and 2 share a caption: each is a positive of the other, so this matching is perfect
    perfect = contrastive_loss(logits, ["a", "b", "b"])
    assert perfect.item() == pytest.approx(-math.log(math.exp(5) / (math.exp(5) + 2)) * 1 / 3
                                           + 2 / 3 * -0.5 * 2 * math.log(math.exp(5) / (2 * math.exp(5) + 1)),
                                           rel=1e-5)
    cfg = OmegaConf.load(write_config(tmp_path, length=16, batch_size=8, max_steps=3, every=100, extra=QUIET))
    cfg.model = {"base_learning_rate": 1e-4, "target": "sdkit.training.clip.SmallCLIP",
                 "params": {"embed_dim": 32, "image_size": 8, "vision": {"width": 8, "channel_mult": [1, 2]},
                            "text_encoder": "transformer", "text": {"width": 32, "layers": 1, "heads": 2}}}
    OmegaConf.save(cfg, tmp_path / "clip.yaml")
    assert run_mod.main(["-b", str(tmp_path / "clip.yaml"), "--name", "clip", "-l", str(tmp_path / "logs")]) == 0
    state = load(run_folder(tmp_path / "logs", "clip") / "checkpoints" / "last.ckpt")["state_dict"]
    assert "logit_scale" in state and any(k.startswith("visual.") for k in state)
    assert any(k.startswith("text.transformer.transformer.text_model.") for k in state)


def test_fsdp_keeps_buffers_in_float32_under_bf16_mixed():
    """Lightning's bf16-mixed FSDP policy casts buffers to bfloat16, where ᾱ_0 = 0.99915 rounds to 1 (checked
    here); sdkit's strategy keeps parameters and reduction in bfloat16 and buffers in float32."""
    from lightning.pytorch.plugins.precision import FSDPPrecision

    from sdkit.training.strategies import fsdp_strategy

    assert torch.tensor(1 - 0.00085, dtype=torch.bfloat16).item() == 1.0
    strategy = fsdp_strategy()
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    config = strategy.mixed_precision_config
    assert FSDPPrecision("bf16-mixed").mixed_precision_config.buffer_dtype == torch.bfloat16   # Lightning's own
    assert (config.param_dtype, config.reduce_dtype, config.buffer_dtype) == (torch.bfloat16, torch.bfloat16,
                                                                              torch.float32)
    strategy.precision_plugin = FSDPPrecision("32-true")
    assert strategy.mixed_precision_config.buffer_dtype == torch.float32


def test_images_reach_the_autoencoder_in_its_own_dtype():
    """FSDP's bf16-mixed forward holds the frozen autoencoder's parameters in bfloat16 (a GPU run: "Input type
    (float) and bias type (BFloat16) should be the same"); the images are cast to its dtype and the moments come
    back float32, equal to the float32 encoder's within bfloat16's rounding."""
    from sdkit.training.diffusion import LatentDiffusionModule

    module = LatentDiffusionModule(OmegaConf.to_container(sdkit.load_config("tiny-test").model), seed=3)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        reference = module._moments(images)
        module.ldm.first_stage_model.to(torch.bfloat16)
        low = module._moments(images)
    assert reference.dtype == low.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: each layer rounds to 2⁻⁸ relative; a few layers deep, well under 10%
    assert (low - reference).norm() / reference.norm() < 0.1


FSDP_STEP = r"""
import os, sys, torch, torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, MixedPrecision
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
import sdkit
from sdkit.nn.attention import SpatialTransformer
from sdkit.nn.unet import ResBlock
from sdkit.training.diffusion import LatentDiffusionModule

dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
batch = {"jpg": torch.rand(2, 32, 32, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1,
         "txt": ["a red circle", "a blue square"], "index": torch.arange(2)}

class Step(torch.nn.Module):   # what Lightning's forward redirection does: training_step through FSDP's forward
    def __init__(self, module):
        super().__init__()
        self.module = module
    def forward(self, batch):
        return self.module.shared_step(batch, step=0, split="train", ucg=0.0)[0]

def module():
    return LatentDiffusionModule(OmegaConf.to_container(sdkit.load_config("tiny-test").model), seed=3)

plain = Step(module())(batch)
# sdkit's FSDP strategy's wrapping and precision: ResBlock/SpatialTransformer units, bf16 params, fp32 buffers
mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.float32)
wrapped = FSDP(Step(module()), mixed_precision=mp, auto_wrap_policy=ModuleWrapPolicy({ResBlock, SpatialTransformer}),
               use_orig_params=True, device_id=torch.device("cpu"))
loss = wrapped(batch)
loss.backward()
grads = [p.grad for n, p in wrapped.named_parameters() if "diffusion_model" in n and p.requires_grad]
print(float(plain), float(loss), sum(g is not None for g in grads), len(grads))
dist.destroy_process_group()
"""


def test_an_fsdp_bf16_training_step_runs_on_the_cpu(tmp_path):
    """FSDP on one CPU process (gloo) with the strategy's wrapping and bf16-mixed precision. The lent GPU's FSDP
    step found the first bug (the frozen autoencoder got bf16 weights and float32 images); this step found the
    second (the UNet's blocks, wrapped by FSDP, no longer looked like ResBlocks to TimestepEmbedSequential, so no
    timestep embedding was passed). The loss equals the float32 step's within bfloat16's rounding, and every
    UNet parameter gets a gradient."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "fsdp_step.py"
    script.write_text(FSDP_STEP)
    done = subprocess.run([sys.executable, str(script), str(port)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    plain, fsdp, with_grad, total = done.stdout.split()[-4:]
    assert abs(float(fsdp) - float(plain)) <= 0.05 * float(plain)   # bf16: ~3 significant digits per op
    assert int(with_grad) == int(total) > 0
