"""Invisible watermark: invisible-watermark's `dwtDct`, stamped on saved images as SD v1's scripts did.

SD v1's txt2img ran `WatermarkEncoder().set_watermark('bytes', b"StableDiffusionV1")` and `encode(bgr, 'dwtDct')`
on every saved image; its test decoded 136 bits (17 bytes). sdkit does the same with a payload per model family:

    apply_watermark(image)                            # PIL or uint8 RGB numpy; payload "StableDiffusionV1"
    apply_watermark(image, SDKIT_PAYLOAD)             # "sdkit": the kit's own models
    decode_watermark(image, SD_V1_PAYLOAD).matches    # True when every bit reads back
    save_png(image, "out.png", payload=...)           # watermark + a PNG tEXt chunk saying what was done
    $ sdkit watermark decode out.png

How dwtDct works (invisible-watermark 0.2.0): RGB -> YUV; a one-level Haar DWT of the U channel (Y has scale 0
and the channel loop never reaches V); the LL band is cut into 4x4 blocks, and in each block the largest value
other than the first is quantised with step 36 to an odd or even half-step: one payload bit per block, the
payload repeated over all blocks in raster order. Decoding takes the majority vote for each bit. An image
therefore has `capacity(h, w) = (h // 8) * (w // 8)` bit slots: 4096 at 512x512, 30 votes per SD bit.

What to expect (measured by benchmarks/watermark_robustness.py on 36 images of 512x512; table in its docstring):
despite its name no DCT is taken (ShieldMnt/invisible-watermark#39), so each bit sits on a raw LL value among
near-equal neighbours, one of which often becomes the largest after embedding: even a lossless round trip
reads some bits wrong. On photos 96% of the 136 SD bits read back (every image detected, the whole payload in
17%); on images with large white or saturated areas (the kit's shapes and emoji, drawn on white) 50-72%: the
U-channel change is clipped away there (an all-white image keeps none of it, while a flat mid-grey one reads
back exactly; the invisible-watermark README lists homogeneous backgrounds as a known defect). So
`WatermarkReading.detected` (a bit accuracy that an unmarked image reaches with probability 1e-4) is the
useful test; `matches` (all bits) is strict. JPEG (even quality
95), resizing and cropping remove the mark; a resize that comes back to the original size does not.

The rule for small images (deliberate): a watermark is embedded when invisible-watermark accepts the image
(at least 256x256 pixels) and every payload bit gets at least `min_votes` slots (default 1: the payload fits
once). Smaller images are left unchanged, a `WatermarkSkipped` warning says so, and the decision is recorded:
in `image.info["sdkit-watermark"]` for PIL images and as a PNG tEXt chunk of that name by `save_png`; an
embedded watermark is recorded there too. `on_small="error"` raises instead. Stamping small images anyway
(calling the algorithm below the library's guard) would mostly pretend: at 64x64 the 40-bit "sdkit" payload
gets 1.6 votes per bit and reads back at 79% (photos; 38% detected, none exact) / 64% (flat images).
The kit's payload is short (5 bytes) so that it gets 3.4x the votes of the SD one in the same image.
"""
from __future__ import annotations

import dataclasses
import math
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

SD_V1_PAYLOAD = "StableDiffusionV1"  # 17 bytes = 136 bits, as CompVis' scripts
SDKIT_PAYLOAD = "sdkit"  # 5 bytes = 40 bits, for models trained with the kit
KNOWN_PAYLOADS = (SD_V1_PAYLOAD, SDKIT_PAYLOAD)
LIBRARY_MIN_PIXELS = 256 * 256  # invisible-watermark refuses smaller images
MIN_VOTES = 1  # bit slots per payload bit below which the mark is skipped (1: the payload must fit once)
FALSE_POSITIVE_RATE = 1e-4  # for `detected`: how often an unmarked image may pass
PNG_KEY = "sdkit-watermark"


class WatermarkSkipped(UserWarning):
    """An image was saved without the watermark because it is too small to carry it (see the module docs)."""


def _bytes(payload: str | bytes) -> bytes:
    return payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)


def payload_bits(payload: str | bytes) -> int:
    """Bits needed for a payload (8 per UTF-8 byte)."""
    return 8 * len(_bytes(payload))


def capacity(height: int, width: int) -> int:
    """Bit slots dwtDct has in an image: 4x4 blocks in the Haar LL band of the 4-aligned crop."""
    return (height // 8) * (width // 8)


def skip_reason(height: int, width: int, payload: str | bytes, min_votes: float = MIN_VOTES) -> str | None:
    """Why an image of this size gets no watermark under the rule above, or None when it gets one."""
    bits, slots = payload_bits(payload), capacity(height, width)
    if not bits:
        return "the payload is empty"
    if height * width < LIBRARY_MIN_PIXELS:
        return (f"a {width}x{height} image is below invisible-watermark's minimum of 256x256 pixels "
                f"({slots} bit slots for a {bits}-bit payload)")
    if slots < min_votes * bits:
        return (f"a {width}x{height} image has {slots} bit slots, {slots / bits:.1f} per bit of the {bits}-bit "
                f"payload; the rule asks for at least {min_votes:g}")
    return None


def _status(height: int, width: int, payload: str | bytes, reason: str | None) -> str:
    name = _bytes(payload).decode("utf-8", "replace")
    if reason:
        return f"skipped: {reason}"
    bits = payload_bits(payload)
    return f"dwtDct payload={name!r} bits={bits} votes_per_bit={capacity(height, width) / bits:.1f}"


def _as_rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return image
    raise TypeError("The watermark lives in 8-bit pixel values: pass a PIL image or a uint8 RGB array [H, W, 3] "
                    f"(convert float images with (x * 255).round().astype(np.uint8)); got {_describe(image)}.")


def _describe(image: Any) -> str:
    if isinstance(image, np.ndarray):
        return f"a {image.dtype} array of shape {image.shape}"
    return type(image).__name__


def _embed(rgb: np.ndarray, payload: bytes) -> np.ndarray:
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    return encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")[:, :, ::-1]  # it works on BGR


def apply_watermark(images: Any, payload: str | bytes = SD_V1_PAYLOAD, *, min_votes: float = MIN_VOTES,
                    on_small: str = "warn") -> Any:
    """Embed `payload` in each image; returns the same form (PIL image, uint8 RGB array [H, W, 3] or
    [B, H, W, 3], or a list). Images too small for the payload follow the rule in the module docs:
    `on_small="warn"` (default) leaves them unchanged with a `WatermarkSkipped` warning, "ignore" does the
    same silently, "error" raises. PIL results carry what was done in `image.info["sdkit-watermark"]`."""
    if on_small not in ("warn", "ignore", "error"):
        raise ValueError(f"on_small={on_small!r}: use 'warn', 'ignore' or 'error'.")
    if isinstance(images, (list, tuple)):
        return [apply_watermark(image, payload, min_votes=min_votes, on_small=on_small) for image in images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return np.stack([apply_watermark(image, payload, min_votes=min_votes, on_small=on_small) for image in images])
    rgb = _as_rgb_array(images)
    height, width = rgb.shape[:2]
    reason = skip_reason(height, width, payload, min_votes)
    if reason is None:
        out = _embed(rgb, _bytes(payload))
    elif on_small == "error":
        raise ValueError(f"Cannot watermark: {reason}. Use a larger image, a shorter payload, or on_small='warn'.")
    else:
        if on_small == "warn":
            warnings.warn(f"Image saved without the invisible watermark: {reason}.", WatermarkSkipped, stacklevel=2)
        out = rgb.copy()
    if isinstance(images, Image.Image):
        result = Image.fromarray(np.ascontiguousarray(out))
        result.info.update(images.info)
        result.info[PNG_KEY] = _status(height, width, payload, reason)
        return result
    return np.ascontiguousarray(out)


def pnginfo(image: Image.Image) -> PngImagePlugin.PngInfo:
    """The PNG text chunks for an image returned by `apply_watermark` (its watermark record)."""
    info = PngImagePlugin.PngInfo()
    if PNG_KEY in image.info:
        info.add_text(PNG_KEY, image.info[PNG_KEY])
    return info


def save_png(image: Any, path: str | os.PathLike, payload: str | bytes | None = SD_V1_PAYLOAD, *,
             min_votes: float = MIN_VOTES, on_small: str = "warn") -> Image.Image:
    """Watermark (unless `payload` is None) and save as PNG with the "sdkit-watermark" text chunk."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(_as_rgb_array(image))
    if payload is not None:
        image = apply_watermark(image, payload, min_votes=min_votes, on_small=on_small)
    image.save(path, format="PNG", pnginfo=pnginfo(image))
    return image


@dataclasses.dataclass
class WatermarkReading:
    bits: np.ndarray  # bool [n_bits], the majority vote per bit
    payload: bytes  # the bits packed into bytes
    expected: bytes | None = None

    @property
    def text(self) -> str | None:
        """The payload as UTF-8 text, or None when it is not valid UTF-8 (no or a damaged watermark)."""
        try:
            return self.payload.decode("utf-8")
        except UnicodeDecodeError:
            return None

    @property
    def bit_accuracy(self) -> float | None:
        """Fraction of bits equal to the expected payload's (0.5 is chance)."""
        if self.expected is None:
            return None
        return float((self.bits == _unpack(self.expected)).mean())

    @property
    def matches(self) -> bool | None:
        """Every bit read back (strict: dwtDct often gets a few bits wrong even without any compression)."""
        return None if self.expected is None else self.payload == self.expected

    @property
    def detected(self) -> bool | None:
        """Bit accuracy above what an unmarked image reaches with probability FALSE_POSITIVE_RATE."""
        if self.expected is None:
            return None
        return self.bit_accuracy >= detection_threshold(len(self.bits))


def detection_threshold(n_bits: int, false_positive: float = FALSE_POSITIVE_RATE) -> float:
    """Smallest bit accuracy that n fair coin flips reach with probability <= false_positive."""
    tail = 0.0
    for k in range(n_bits, -1, -1):
        tail += math.comb(n_bits, k) / 2**n_bits
        if tail > false_positive:
            return (k + 1) / n_bits
    return 0.0


def _unpack(payload: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(payload, dtype=np.uint8)).astype(bool)


def decode_watermark(image: Any, payload: str | bytes | None = SD_V1_PAYLOAD, *, n_bits: int | None = None
                     ) -> WatermarkReading:
    """Read a dwtDct watermark. Give the expected `payload` (its length sets the bits to read, and the reading
    reports `bit_accuracy` and `matches`), or `payload=None, n_bits=...` to read an unknown one."""
    rgb = _as_rgb_array(image)
    expected = None if payload is None else _bytes(payload)
    n = payload_bits(expected) if expected is not None else n_bits
    if not n or n % 8:
        raise ValueError("Say what to read: an expected payload, or n_bits (a positive multiple of 8; "
                         f"{payload_bits(SD_V1_PAYLOAD)} for {SD_V1_PAYLOAD!r}).")
    slots = capacity(*rgb.shape[:2])
    if slots < n:
        raise ValueError(f"A {rgb.shape[1]}x{rgb.shape[0]} image has {slots} dwtDct bit slots, fewer than the "
                         f"{n} bits asked for: it cannot hold this watermark.")
    from imwatermark.maxDct import EmbedMaxDct

    # WatermarkDecoder.decode(bgr, 'dwtDct') is exactly this call behind a 256x256 size guard; calling the
    # algorithm directly also reads crops and downscaled copies of watermarked images.
    bits = np.asarray(EmbedMaxDct(watermarks=[], wmLen=n).decode(np.ascontiguousarray(rgb[:, :, ::-1])), dtype=bool)
    return WatermarkReading(bits, np.packbits(bits).tobytes(), expected)


def read_file(path: str | os.PathLike, payloads: tuple[str | bytes, ...] = KNOWN_PAYLOADS
              ) -> tuple[str | None, dict[str, WatermarkReading | str]]:
    """What `sdkit watermark decode FILE` reports: the file's "sdkit-watermark" record (if any) and, for each
    payload, a reading or the reason it cannot be read from this image."""
    with Image.open(path) as image:
        record = image.info.get(PNG_KEY)
        rgb = np.asarray(image.convert("RGB"))
    readings: dict[str, WatermarkReading | str] = {}
    for payload in payloads:
        name = _bytes(payload).decode("utf-8", "replace")
        try:
            readings[name] = decode_watermark(rgb, payload)
        except ValueError as e:
            readings[name] = str(e)
    return record, readings


def decode_command(path: str | os.PathLike, payloads: list[str] | None = None) -> int:
    """Print what `read_file` finds; exit status 0 when a payload is detected, 1 when none is."""
    if not os.path.isfile(path):
        print(f"sdkit watermark decode: no such file: {path}")
        return 2
    record, readings = read_file(path, tuple(payloads) if payloads else KNOWN_PAYLOADS)
    print(f"{path}: record in file: {record or 'none'}")
    found = False
    for name, reading in readings.items():
        if isinstance(reading, str):
            print(f"  {name!r}: cannot be read: {reading}")
            continue
        found |= bool(reading.detected)
        verdict = "exact" if reading.matches else "detected" if reading.detected else "not found"
        print(f"  {name!r} ({len(reading.bits)} bits): {verdict}, bit accuracy {reading.bit_accuracy:.3f} "
              f"(detection needs {detection_threshold(len(reading.bits)):.3f}); read {reading.payload!r}")
    return 0 if found else 1
