"""Interactive explorers for the notebooks (ipywidgets 8, JupyterLab 4).

    from sdkit.widgets import Txt2ImgExplorer, Img2ImgExplorer, MaskPainter, InpaintExplorer
    Txt2ImgExplorer(model, "a red circle")          # last line of a cell: shows the controls and the image

Each explorer re-runs its pipeline when a control is released, and shows the sampler's x̂₀ at every step (the
pipelines' per-step ``callback``) before the final image. The controls are attributes (``.guidance``,
``.steps``, ...), so a script or a test can set ``explorer.guidance.value = 3`` and read ``explorer.result``.
The mask painter draws with the mouse on an ipycanvas Canvas; ``.mask`` is the painted mask at image size.

Live preview: given ``preview_model=sdkit.load_model("tiny-lcm")`` (the laptop model distilled for 4 ``lcm``
steps without guidance, about 0.15 s an image on 2 cores), the sliders report while they are dragged; every
value draws the distilled model's 4-step image at once, and the full sampler runs when the slider has rested
for ``settle_s`` seconds (the last value only). Without a running event loop (a script, a test) the full image
follows each preview at once.
"""
from __future__ import annotations

import asyncio
import base64
import io
import time
from abc import ABC, abstractmethod

import ipywidgets as widgets
import numpy as np
from PIL import Image

from .pipelines import img2img, inpaint, latent_preview, txt2img
from .samplers import SAMPLERS, sampler_default, sampler_options

PIXELATED = "image-rendering: pixelated"


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def still_png(image: Image.Image, width: str | int | None = None) -> str:
    """Base64 PNG of ``image``, enlarged with sharp pixels to ``width`` (e.g. "256px"): the static copy of a widget's
    picture that notebooks keep in their stored output, where JupyterLab shows the live widget instead."""
    size = int(str(width).removesuffix("px")) if width else image.width
    if size > image.width:
        image = image.resize((size, round(image.height * size / image.width)), Image.NEAREST)
    return base64.b64encode(png_bytes(image)).decode("ascii")


def image_widget(size: int) -> widgets.Image:
    # small images are shown enlarged; the style keeps their pixels sharp instead of blurred
    image = widgets.Image(format="png", layout=widgets.Layout(width=f"{size}px", height=f"{size}px"))
    image.add_class("sdkit-pixelated")
    return image


def pixelated_style() -> widgets.HTML:
    return widgets.HTML(f"<style>.sdkit-pixelated img, img.sdkit-pixelated {{ {PIXELATED} }}</style>")


class Explorer(ABC):
    """Shared machinery: a row of controls, a preview image, a status line; re-render on change."""

    title = "explorer"

    def __init__(self, model, display_size: int = 256, preview: str = "vae", *, preview_model=None,
                 preview_steps: int = 4, settle_s: float = 0.6):
        self.model = model
        self.preview = preview
        self.preview_model = preview_model     # a few-step model (tiny-lcm) drawn while a slider moves
        self.preview_steps = preview_steps
        self.settle_s = settle_s
        self.image = image_widget(display_size)
        self.status = widgets.Label()
        self.result = None
        self.preview_result = None
        self.shown: Image.Image | None = None     # the image the widget shows now
        self.renders = 0
        self.previews = 0
        self._pending_release: asyncio.TimerHandle | None = None
        self.widget: widgets.Widget | None = None

    @abstractmethod
    def controls(self) -> list[widgets.Widget]:
        """Subclasses say this."""

    @abstractmethod
    def run(self, callback, preview: bool = False):
        """The pipeline with the current controls; ``preview``: the preview model's few-step version."""

    @abstractmethod
    def describe(self) -> str:
        """Subclasses say this."""

    def watch(self) -> None:
        for control in self.controls():
            if self.preview_model is not None and isinstance(control, widgets.IntSlider | widgets.FloatSlider):
                control.continuous_update = True     # every value while dragging, for the preview
            control.observe(self.on_change, names="value")

    def on_change(self, change=None) -> None:
        """A control moved: the full render, or with a preview model the preview now and the full one on release."""
        if getattr(self, "quiet", False):
            return
        if self.preview_model is None:
            self.render(change)
            return
        self.render_preview()
        self.schedule_release()

    def sampling(self, callback, preview: bool) -> dict:
        """The model and sampler arguments of a call: the controls', or the preview model's 4 lcm steps (it was
        distilled with guidance built in, so it samples without guidance and ignores the sampler controls)."""
        if preview:
            return {"model": self.preview_model, "sampler": "lcm", "steps": self.preview_steps,
                    "guidance_scale": 1.0, "seed": self.seed.value, "progress": False}
        return {"model": self.model, "sampler": self.sampler.value, "steps": self.steps.value,
                "guidance_scale": self.guidance.value, "seed": self.seed.value, "callback": callback,
                "progress": False}

    def preview_settings(self) -> str:
        return f"preview: {self.preview_steps} lcm steps of the distilled model"

    def render_preview(self) -> None:
        """The preview model's image for the current controls (no per-step images: it is one image in ~0.15 s)."""
        start = time.perf_counter()
        self.preview_result = self.run(None, preview=True)
        self.show_image(self.preview_result.images[0])
        self.previews += 1
        self.status.value = f"{self.preview_settings()} · {time.perf_counter() - start:.2f} s · {self.describe()}"

    def schedule_release(self) -> None:
        """Run the full sampler once the controls have rested ``settle_s`` seconds; each move restarts the wait."""
        if self._pending_release is not None:
            self._pending_release.cancel()
            self._pending_release = None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:   # no event loop (a script or a test): nothing can wait, so render now
            self.render()
            return
        self._pending_release = loop.call_later(self.settle_s, self._release)

    def _release(self) -> None:
        self._pending_release = None
        self.render()

    def show_image(self, image: Image.Image) -> None:
        self.image.value = png_bytes(image)
        self.shown = image

    def render(self, change=None) -> None:
        """Run the pipeline with the current controls, showing every step's x̂₀, then the result."""
        if getattr(self, "quiet", False):   # a control is being set to follow another: one render, not two
            return
        start = time.perf_counter()
        self.status.value = f"sampling: {self.describe()}"

        def on_step(step, total, x, x0_pred):
            self.show_image(latent_preview(self.model, x0_pred[:1], method=self.preview)[0])
            self.status.value = f"step {step + 1}/{total}: {self.describe()}"

        self.result = self.run(on_step)
        self.show_image(self.result.images[0])
        self.renders += 1
        self.status.value = f"{self.describe()} · {time.perf_counter() - start:.1f} s"

    def layout(self) -> widgets.Widget:
        return widgets.VBox([pixelated_style(), widgets.HBox([widgets.VBox(self.controls()), self.image]),
                             self.status])

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude)
        bundle["text/plain"] = f"{type(self).__name__}({self.describe()})"   # stable text for nbval
        if self.shown is not None:   # a still of the last image, for readers without a kernel (GitHub, nbviewer)
            bundle["image/png"] = still_png(self.shown, self.image.layout.width)
        return bundle


def eta_default(sampler: str) -> float:
    """A sampler's own eta: 0 for ddim, 1 for the ancestral euler_a and dpmpp_2m_sde, 0 where it has none."""
    return float(sampler_default(sampler, "eta")) if "eta" in sampler_options(sampler) else 0.0


def sampler_controls(sampler: str, steps: int, eta: float, seed: int, guidance_scale: float) -> dict:
    slider = {"continuous_update": False, "style": {"description_width": "80px"}}
    return {
        "sampler": widgets.Dropdown(options=sorted(SAMPLERS), value=sampler, description="sampler",
                                    style=slider["style"]),
        "steps": widgets.IntSlider(value=steps, min=1, max=60, description="steps", **slider),
        "eta": widgets.FloatSlider(value=eta, min=0.0, max=1.0, step=0.05, description="eta", **slider),
        "seed": widgets.IntText(value=seed, description="seed", style=slider["style"]),
        "guidance": widgets.FloatSlider(value=guidance_scale, min=0.0, max=15.0, step=0.5, description="guidance",
                                        **slider),
    }


class Txt2ImgExplorer(Explorer):
    """Prompt, sampler, steps, eta, seed and guidance scale for ``txt2img``, with a live per-step preview."""

    def __init__(self, model, prompt: str = "a red circle", *, sampler: str = "dpmpp_2m", steps: int = 20,
                 eta: float | None = None, seed: int = 0, guidance_scale: float = 5.0, display_size: int = 256,
                 render: bool = True, preview_model=None, preview_steps: int = 4, settle_s: float = 0.6):
        super().__init__(model, display_size, preview_model=preview_model, preview_steps=preview_steps,
                         settle_s=settle_s)
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False,
                                   layout=widgets.Layout(width="360px"))
        eta = eta_default(sampler) if eta is None else eta
        for name, control in sampler_controls(sampler, steps, eta, seed, guidance_scale).items():
            setattr(self, name, control)
        self.sampler.observe(self.follow_sampler_eta, names="value")   # before watch(): eta first, then a render
        self.widget = self.layout()
        self.watch()
        if render:
            self.render()

    def controls(self):
        return [self.prompt, self.sampler, self.steps, self.eta, self.seed, self.guidance]

    def follow_sampler_eta(self, change) -> None:
        """A newly chosen sampler starts at its own eta (euler_a at 1: without noise it would be plain Euler)."""
        self.quiet = True
        try:
            self.eta.value = eta_default(change["new"])
        finally:
            self.quiet = False

    def describe(self) -> str:
        return (f"{self.prompt.value!r}, {self.sampler.value}, {self.steps.value} steps, eta {self.eta.value:g}, "
                f"seed {self.seed.value}, guidance {self.guidance.value:g}")

    def run(self, callback, preview: bool = False):
        settings = self.sampling(callback, preview)
        if not preview:
            settings["eta"] = self.eta.value
        return txt2img(prompt=self.prompt.value, **settings)


class Img2ImgExplorer(Explorer):
    """``img2img`` from a fixed start image: the strength slider says how much of it is repainted."""

    def __init__(self, model, init_image: Image.Image, prompt: str, *, strength: float = 0.6,
                 sampler: str = "ddim", steps: int = 20, seed: int = 0, guidance_scale: float = 5.0,
                 display_size: int = 256, render: bool = True, preview_model=None, preview_steps: int = 4,
                 settle_s: float = 0.6):
        super().__init__(model, display_size, preview_model=preview_model, preview_steps=preview_steps,
                         settle_s=settle_s)
        self.init_image = init_image.convert("RGB")
        self.prompt = widgets.Text(value=prompt, description="prompt", continuous_update=False,
                                   layout=widgets.Layout(width="360px"))
        self.strength = widgets.FloatSlider(value=strength, min=0.0, max=1.0, step=0.05, description="strength",
                                            continuous_update=False, style={"description_width": "80px"})
        controls = sampler_controls(sampler, steps, 0.0, seed, guidance_scale)
        self.sampler, self.steps, self.seed, self.guidance = (controls[k] for k in ("sampler", "steps", "seed",
                                                                                    "guidance"))
        self.start = image_widget(display_size)
        self.start.value = png_bytes(self.init_image)
        self.widget = widgets.VBox([pixelated_style(), widgets.HBox([widgets.VBox(self.controls()), self.start,
                                                                     self.image]), self.status])
        self.watch()
        if render:
            self.render()

    def controls(self):
        return [self.prompt, self.strength, self.sampler, self.steps, self.seed, self.guidance]

    def describe(self) -> str:
        return (f"{self.prompt.value!r}, strength {self.strength.value:g}, {self.sampler.value}, "
                f"{self.steps.value} steps, seed {self.seed.value}, guidance {self.guidance.value:g}")

    def run(self, callback, preview: bool = False):
        return img2img(init_image=self.init_image, prompt=self.prompt.value, strength=self.strength.value,
                       **self.sampling(callback, preview))


class MaskPainter:
    """Paint a mask over an image with the mouse (ipycanvas): drag to paint, the eraser toggle to remove.

    ``.mask`` is the mask as a PIL "L" image of the image's size (white = repaint). ``paint(x, y)`` and
    ``clear()`` do from code what the mouse does (coordinates in image pixels), so notebooks stay reproducible.
    """

    def __init__(self, image: Image.Image, *, scale: int = 4, brush: float = 6.0):
        from ipycanvas import Canvas, hold_canvas

        self._hold = hold_canvas
        self.image = image.convert("RGB")
        self.scale = scale
        self.mask_array = np.zeros((self.image.height, self.image.width), dtype=np.float32)
        width, height = self.image.width * scale, self.image.height * scale
        self.canvas = Canvas(width=width, height=height,
                             layout=widgets.Layout(width=f"{width}px", height=f"{height}px"))
        self.brush = widgets.FloatSlider(value=brush, min=1.0, max=20.0, step=0.5, description="brush (px)",
                                         continuous_update=False)
        self.eraser = widgets.ToggleButton(value=False, description="eraser")
        self.clear_button = widgets.Button(description="clear")
        self.clear_button.on_click(lambda _: self.clear())
        self._last = None               # where the held mouse button last painted (image pixels)
        self.canvas.on_mouse_down(self._on_down)
        self.canvas.on_mouse_move(self._on_move)
        self.canvas.on_mouse_up(self._on_up)
        self.canvas.on_mouse_out(self._on_up)
        self.widget = widgets.VBox([self.canvas, widgets.HBox([self.brush, self.eraser, self.clear_button])])
        self.redraw()

    @property
    def mask(self) -> Image.Image:
        return Image.fromarray((self.mask_array * 255).round().astype(np.uint8), mode="L")

    def paint(self, x: float, y: float, erase: bool | None = None) -> None:
        """Paint (or erase) a disc of the brush radius at image pixel (x, y)."""
        erase = self.eraser.value if erase is None else erase
        yy, xx = np.mgrid[:self.mask_array.shape[0], :self.mask_array.shape[1]]
        disc = (xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2 <= self.brush.value ** 2
        self.mask_array[disc] = 0.0 if erase else 1.0
        self.redraw()

    def clear(self) -> None:
        self.mask_array[:] = 0.0
        self.redraw()

    def overlay(self) -> np.ndarray:
        """The image with the mask shown in translucent red, enlarged by ``scale`` (uint8 [H, W, 3])."""
        rgb = np.asarray(self.image, dtype=np.float32)
        red = np.array([255.0, 40.0, 40.0])
        shown = rgb * (1 - 0.55 * self.mask_array[..., None]) + red * 0.55 * self.mask_array[..., None]
        shown = shown.round().astype(np.uint8)
        return shown.repeat(self.scale, axis=0).repeat(self.scale, axis=1)

    def redraw(self) -> None:
        with self._hold():
            self.canvas.put_image_data(self.overlay(), 0, 0)

    def stroke(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """Paint discs along a segment, close enough to leave no gaps (mouse moves arrive sparsely)."""
        n = max(1, int(np.ceil(np.hypot(x1 - x0, y1 - y0) / max(self.brush.value / 2, 0.5))))
        for t in np.linspace(0.0, 1.0, n + 1)[1:]:
            self.paint(x0 + t * (x1 - x0), y0 + t * (y1 - y0))

    def _on_down(self, x, y):
        self._last = (x / self.scale, y / self.scale)
        self.paint(*self._last)

    def _on_move(self, x, y):
        if self._last is not None:
            here = (x / self.scale, y / self.scale)
            self.stroke(*self._last, *here)
            self._last = here

    def _on_up(self, x, y):
        self._last = None

    def _repr_mimebundle_(self, include=None, exclude=None):
        bundle = self.widget._repr_mimebundle_(include=include, exclude=exclude)
        bundle["text/plain"] = f"MaskPainter({self.image.width}×{self.image.height}, {int(self.mask_array.sum())} " \
                               "pixels painted)"
        bundle["image/png"] = still_png(Image.fromarray(self.overlay()))
        return bundle


class InpaintExplorer(Explorer):
    """Paint a mask, then press "inpaint" (painting is too frequent an event to re-sample on every stroke)."""

    def __init__(self, model, image: Image.Image, prompt: str, *, sampler: str = "ddim", steps: int = 20,
                 seed: int = 0, guidance_scale: float = 5.0, scale: int = 4, painter: MaskPainter | None = None,
                 preview_model=None, preview_steps: int = 4):
        super().__init__(model, display_size=image.width * scale, preview_model=preview_model,
                         preview_steps=preview_steps)
        self.painter = painter or MaskPainter(image, scale=scale)
        self.prompt = widgets.Text(value=prompt, description="prompt", layout=widgets.Layout(width="360px"))
        controls = sampler_controls(sampler, steps, 0.0, seed, guidance_scale)
        self.sampler, self.steps, self.seed, self.guidance = (controls[k] for k in ("sampler", "steps", "seed",
                                                                                    "guidance"))
        self.button = widgets.Button(description="inpaint", button_style="primary")
        self.button.on_click(lambda _: self.on_change())
        self.widget = widgets.VBox([pixelated_style(),
                                    widgets.HBox([self.painter.widget, self.image]),
                                    widgets.HBox([widgets.VBox(self.controls()), self.button]), self.status])

    def controls(self):
        return [self.prompt, self.sampler, self.steps, self.seed, self.guidance]

    def describe(self) -> str:
        return (f"{self.prompt.value!r}, {int(self.painter.mask_array.sum())} pixels masked, {self.sampler.value}, "
                f"{self.steps.value} steps, seed {self.seed.value}, guidance {self.guidance.value:g}")

    def mask_is_empty(self) -> bool:
        if self.painter.mask_array.any():
            return False
        self.status.value = "the mask is empty: paint the region to repaint on the left image first"
        return True

    def on_change(self, change=None) -> None:
        if not self.mask_is_empty():
            super().on_change(change)

    def render(self, change=None) -> None:
        if not self.mask_is_empty():
            super().render(change)

    def run(self, callback, preview: bool = False):
        return inpaint(image=self.painter.image, mask=self.painter.mask, prompt=self.prompt.value,
                       **self.sampling(callback, preview))
