"""The notebook explorers: moving a control re-runs the pipeline with that value, previews arrive per step, and the
mask painter turns mouse events into the mask the inpainting pipeline receives."""
import numpy as np
import pytest
import torch

import sdkit
from sdkit.pipelines import img2img, inpaint, txt2img
from sdkit.widgets import Img2ImgExplorer, png_bytes, InpaintExplorer, MaskPainter, Txt2ImgExplorer

FAST = dict(steps=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def random_tiny_test(seed: int):
    """tiny-test with every weight random (its zero-initialised output layers would make ε ignore the prompt)."""
    model = sdkit.load_model("tiny-test")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="module")
def model():
    return random_tiny_test(seed=0)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_moving_the_guidance_slider_re_renders_with_that_value(model):
    explorer = Txt2ImgExplorer(model, "a red circle", guidance_scale=5.0, **FAST)
    first = explorer.image.value
    explorer.guidance.value = 1.0
    assert explorer.renders == 2
    assert explorer.image.value != first
    expected = txt2img(model, "a red circle", guidance_scale=1.0, seed=0, progress=False, **FAST).images[0]
    assert np.array_equal(pixels(explorer.result.images[0]), pixels(expected))
    assert "guidance 1" in explorer.status.value
    assert explorer._repr_mimebundle_()["text/plain"].startswith("Txt2ImgExplorer('a red circle'")


def test_each_control_reaches_the_pipeline(model):
    explorer = Txt2ImgExplorer(model, "a red circle", render=False, **FAST)
    explorer.sampler.value = "euler_a"
    explorer.eta.value = 0.5
    explorer.seed.value = 7
    explorer.steps.value = 3
    expected = txt2img(model, "a red circle", sampler="euler_a", eta=0.5, seed=7, steps=3, guidance_scale=5.0,
                       progress=False).images[0]
    assert np.array_equal(pixels(explorer.result.images[0]), pixels(expected))


def test_the_preview_shows_every_step(model):
    explorer = Txt2ImgExplorer(model, "a red circle", render=False, **FAST)
    shown = []
    explorer.image.observe(lambda change: shown.append(change["new"]), names="value")
    explorer.render()
    # one x̂₀ per step, then the final image (the last step's x̂₀ is the final latent, so the same picture)
    assert len(shown) >= 4 and len(set(map(bytes, shown))) >= 3
    assert bytes(shown[-1]) == png_bytes(explorer.result.images[0])


def test_img2img_strength_slider(model):
    start = txt2img(model, "a red circle", seed=1, progress=False, **FAST).images[0]
    explorer = Img2ImgExplorer(model, start, "a blue square", strength=0.6, **FAST)
    explorer.strength.value = 0.3
    expected = img2img(model, start, "a blue square", strength=0.3, sampler="ddim", seed=0, guidance_scale=5.0,
                       progress=False, **FAST).images[0]
    assert np.array_equal(pixels(explorer.result.images[0]), pixels(expected))


@pytest.fixture(scope="module")
def preview_model():
    """A second random model standing in for tiny-lcm: the preview must come from it, not from the main model."""
    return random_tiny_test(seed=1)


def lcm_preview(model, prompt, seed):
    return txt2img(model, prompt, sampler="lcm", steps=4, guidance_scale=1.0, seed=seed, progress=False).images[0]


def test_sliders_report_while_dragged_only_with_a_preview_model(model, preview_model):
    plain = Txt2ImgExplorer(model, "a red circle", render=False, **FAST)
    live = Txt2ImgExplorer(model, "a red circle", render=False, preview_model=preview_model, **FAST)
    assert not plain.guidance.continuous_update and not plain.steps.continuous_update
    assert live.guidance.continuous_update and live.steps.continuous_update and live.eta.continuous_update
    assert not live.prompt.continuous_update          # half-typed words are not previewed


def test_without_an_event_loop_the_preview_is_followed_by_the_full_image(model, preview_model):
    explorer = Txt2ImgExplorer(model, "a red circle", render=False, preview_model=preview_model, **FAST)
    shown = []
    explorer.image.observe(lambda change: shown.append(bytes(change["new"])), names="value")
    explorer.seed.value = 3
    assert explorer.previews == 1 and explorer.renders == 1
    # first the distilled model's 4 lcm steps without guidance, then the full sampler's steps and image
    assert shown[0] == png_bytes(lcm_preview(preview_model, "a red circle", seed=3))
    full = txt2img(model, "a red circle", seed=3, guidance_scale=5.0, progress=False, **FAST).images[0]
    assert shown[-1] == png_bytes(full)
    assert np.array_equal(pixels(explorer.preview_result.images[0]),
                          pixels(lcm_preview(preview_model, "a red circle", seed=3)))


def test_in_an_event_loop_a_drag_previews_every_value_and_samples_the_last_once_it_rests(model, preview_model):
    import asyncio

    async def drag():
        explorer = Txt2ImgExplorer(model, "a red circle", render=False, preview_model=preview_model,
                                   settle_s=0.2, **FAST)
        for value in (4.0, 3.0, 2.0):        # the values a dragged slider sends
            explorer.guidance.value = value
        after_drag = (explorer.previews, explorer.renders)
        await asyncio.sleep(0.5)
        return explorer, after_drag

    explorer, (previews, renders) = asyncio.run(drag())
    assert (previews, renders) == (3, 0)            # the full sampler waited for the slider to rest
    assert explorer.renders == 1                    # and then ran once, for the last value
    expected = txt2img(model, "a red circle", guidance_scale=2.0, seed=0, progress=False, **FAST).images[0]
    assert np.array_equal(pixels(explorer.result.images[0]), pixels(expected))
    assert np.array_equal(pixels(explorer.shown), pixels(expected))


def test_img2img_preview_uses_the_preview_model_at_the_same_strength(model, preview_model):
    start = txt2img(model, "a red circle", seed=1, progress=False, **FAST).images[0]
    explorer = Img2ImgExplorer(model, start, "a blue square", strength=0.6, render=False,
                               preview_model=preview_model, **FAST)
    explorer.strength.value = 0.5
    expected = img2img(preview_model, start, "a blue square", strength=0.5, sampler="lcm", steps=4,
                       guidance_scale=1.0, seed=0, progress=False).images[0]
    assert np.array_equal(pixels(explorer.preview_result.images[0]), pixels(expected))
    full = img2img(model, start, "a blue square", strength=0.5, sampler="ddim", seed=0, guidance_scale=5.0,
                   progress=False, **FAST).images[0]
    assert np.array_equal(pixels(explorer.result.images[0]), pixels(full))


def test_inpaint_button_previews_with_the_preview_model_then_inpaints(model, preview_model):
    image = txt2img(model, "a red circle", seed=2, progress=False, **FAST).images[0]
    explorer = InpaintExplorer(model, image, "a green triangle", preview_model=preview_model, **FAST)
    explorer.painter.paint(16, 16)
    explorer.button.click()
    assert (explorer.previews, explorer.renders) == (1, 1)
    expected = inpaint(preview_model, image, explorer.painter.mask, "a green triangle", sampler="lcm", steps=4,
                       guidance_scale=1.0, seed=0, progress=False).images[0]
    assert np.array_equal(pixels(explorer.preview_result.images[0]), pixels(expected))
    full = inpaint(model, image, explorer.painter.mask, "a green triangle", sampler="ddim", seed=0,
                   guidance_scale=5.0, progress=False, **FAST).images[0]
    assert np.array_equal(pixels(explorer.result.images[0]), pixels(full))


def test_mouse_strokes_paint_discs_of_the_brush_radius():
    from PIL import Image

    painter = MaskPainter(Image.new("RGB", (32, 32), (200, 200, 200)), scale=4, brush=3.0)
    painter._on_move(40, 40)            # moving without the button held paints nothing
    assert painter.mask_array.sum() == 0
    painter._on_down(40, 40)            # canvas pixels: image pixel (10, 10)
    painter._on_up(40, 40)
    yy, xx = np.mgrid[:32, :32]
    disc = (xx + 0.5 - 10) ** 2 + (yy + 0.5 - 10) ** 2 <= 9
    assert np.array_equal(painter.mask_array > 0, disc)
    painter._on_down(40, 40)
    painter._on_move(80, 40)            # a drag paints along the way it reports
    painter._on_up(80, 40)
    assert painter.mask_array[10, 10:21].all()   # the whole segment, not only its ends
    painter.eraser.value = True
    painter._on_down(40, 40)
    assert painter.mask_array[10, 10] == 0
    mask = painter.mask
    assert mask.mode == "L" and mask.size == (32, 32)
    painter.clear()
    assert painter.mask_array.sum() == 0


def test_inpaint_explorer_uses_the_painted_mask(model):
    image = txt2img(model, "a red circle", seed=2, progress=False, **FAST).images[0]
    explorer = InpaintExplorer(model, image, "a green triangle", **FAST)
    explorer.button.click()
    assert explorer.result is None and "mask is empty" in explorer.status.value
    explorer.painter._on_down(16, 16)
    explorer.painter._on_up(16, 16)
    explorer.button.click()
    expected = inpaint(model, image, explorer.painter.mask, "a green triangle", sampler="ddim", seed=0,
                       guidance_scale=5.0, progress=False, **FAST).images[0]
    assert np.array_equal(pixels(explorer.result.images[0]), pixels(expected))
    far = explorer.painter.mask_array == 0
    assert np.array_equal(pixels(explorer.result.images[0])[far], pixels(image)[far])   # composited back


def test_the_repr_keeps_a_still_of_the_last_image_for_readers_without_a_kernel(model):
    import base64
    import io

    from PIL import Image

    explorer = Txt2ImgExplorer(model, "a red circle", **FAST)
    bundle = explorer._repr_mimebundle_()
    still = Image.open(io.BytesIO(base64.b64decode(bundle["image/png"])))
    assert still.size == (256, 256)                                   # the widget's display size
    small = still.resize(explorer.result.images[0].size, Image.NEAREST)
    assert np.array_equal(pixels(small), pixels(explorer.result.images[0]))   # the final image, enlarged
    painter = MaskPainter(explorer.result.images[0], scale=4)
    painter.paint(8, 8)
    overlay = Image.open(io.BytesIO(base64.b64decode(painter._repr_mimebundle_()["image/png"])))
    assert np.array_equal(np.asarray(overlay), painter.overlay())


@pytest.mark.parametrize("notebook", ["00_tour", "07_guidance_and_img2img", "08_inpainting_and_outpainting"])
def test_stored_widget_outputs_show_an_image_without_a_kernel(notebook):
    """Every stored widget output (a live view) also carries an image/png still, which GitHub and nbviewer show."""
    import json
    from pathlib import Path

    cells = json.loads((Path(__file__).parents[1] / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
               if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert outputs, "the notebook has no widget output"
    assert all("image/png" in o["data"] for o in outputs)
