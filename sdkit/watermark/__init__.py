"""Invisible watermarks on saved images: the kit's robust `spread` mark, and SD v1's `dwtDct` for compatibility.

    apply_watermark(image, SDKIT_PAYLOAD)              # PIL or uint8 RGB numpy; the `spread` mark keyed by "sdkit"
    apply_watermark(image)                             # "StableDiffusionV1": SD v1's dwtDct, plus `spread`
    apply_watermark(image, method="dwtDct")            # exactly CompVis' pixels (their scripts' put_watermark)
    detect_watermark(image, SDKIT_PAYLOAD).found       # spread: found / not found at a false-positive rate <= 1e-4
    decode_watermark(image, SD_V1_PAYLOAD).detected    # dwtDct: the bits read back, their accuracy, detected, exact
    save_png(image, "out.png", payload=...)            # mark + a PNG tEXt chunk saying what was done
    $ sdkit watermark decode out.png [--method dwtDct|all]

Two methods (`method=`; "auto", the default, picks per payload):

- **"spread"** (spread.py; the default for every payload): a keyed ±1 pattern over a grid of cells in relative
  coordinates, embedded in luminance with informed embedding, detected by a weighted correlation whose threshold
  has a false-positive rate <= 1e-4 on any unmarked image (Hoeffding's inequality over the key; union bound over
  the crop search). Zero-bit: it answers "is this payload's mark here?", so decoding tests known payloads. It is
  what survives the kit's own images, which are mostly flat (white or one colour) and small (64x64): PNG, JPEG,
  resizing to half and a centre crop of 75% (spread.py says why this design; benchmarks/watermark_robustness.py
  measures it and invisible-watermark's methods on the kit's outputs). Images under 64 pixels a side are skipped.
- **"dwtDct"** (dwtdct.py): invisible-watermark's dwtDct with the payload's bytes, the pixels SD v1's scripts
  wrote, readable by the reference decoder. Flat and saturated areas, JPEG, resizing and cropping erase it, and
  the library refuses images under 256x256. "auto" writes it, as well as the spread mark, for SD_V1_PAYLOAD (the
  two live in different channels: dwtDct in U, spread in luminance, so neither disturbs the other).

The small-image rule (deliberate): a method that cannot carry the payload in an image (spread: under 64 pixels a
side; dwtDct: under 256x256, or fewer bit slots than payload bits) is skipped for that image. When no method is
left, the image is returned unchanged with a `WatermarkSkipped` warning (`on_small="error"` raises, "ignore"
stays silent). Either way the decision is recorded: in `image.info["sdkit-watermark"]` for PIL images and as a
PNG tEXt chunk of that name by `save_png`.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from . import dwtdct, spread
from .dwtdct import MIN_VOTES, WatermarkReading, capacity, detection_threshold
from .spread import SpreadDetection

SD_V1_PAYLOAD = "StableDiffusionV1"  # 17 bytes = 136 bits, as CompVis' scripts
SDKIT_PAYLOAD = "sdkit"  # for models trained with the kit
KNOWN_PAYLOADS = (SDKIT_PAYLOAD, SD_V1_PAYLOAD)
METHODS = ("auto", "spread", "dwtDct", "both")
FALSE_POSITIVE_RATE = spread.FALSE_POSITIVE_RATE
PNG_KEY = "sdkit-watermark"

__all__ = [
    "FALSE_POSITIVE_RATE",
    "KNOWN_PAYLOADS",
    "METHODS",
    "PNG_KEY",
    "SDKIT_PAYLOAD",
    "SD_V1_PAYLOAD",
    "SpreadDetection",
    "WatermarkReading",
    "WatermarkSkipped",
    "apply_watermark",
    "capacity",
    "decode_command",
    "decode_watermark",
    "detect_watermark",
    "detection_threshold",
    "methods_for",
    "payload_bits",
    "payload_bytes",
    "pnginfo",
    "read_file",
    "save_png",
    "skip_reason",
]


class WatermarkSkipped(UserWarning):
    """An image was saved without a watermark because it is too small to carry it (see the module docs)."""


def payload_bytes(payload: Any) -> bytes:
    """A payload as bytes: text is UTF-8 encoded; anything but text or bytes is refused (an int would otherwise
    become that many NUL bytes)."""
    if isinstance(payload, str):
        try:
            data = payload.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"The watermark payload {payload!r} is not valid text ({e.reason} at position "
                             f"{e.start}): pass printable text or bytes.") from None
    elif isinstance(payload, (bytes, bytearray, memoryview)):
        data = bytes(payload)
    else:
        raise TypeError(f"A watermark payload is text (str) or bytes, e.g. {SDKIT_PAYLOAD!r}; got "
                        f"{type(payload).__name__} {payload!r}. Pass it as a string, e.g. watermark=str(value).")
    if not data:
        raise ValueError("The watermark payload is empty: pass some text, e.g. 'sdkit', or no watermark (None).")
    return data


def payload_bits(payload: str | bytes) -> int:
    """Bits a payload takes in dwtDct (8 per UTF-8 byte)."""
    return 8 * len(payload_bytes(payload))


def methods_for(payload: str | bytes, method: str = "auto") -> tuple[str, ...]:
    """The methods `apply_watermark` writes: "auto" = spread, plus dwtDct for SD v1's payload."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {', '.join(map(repr, METHODS))}.")
    if method == "auto":
        return ("dwtDct", "spread") if payload_bytes(payload) == SD_V1_PAYLOAD.encode() else ("spread",)
    return ("dwtDct", "spread") if method == "both" else (method,)


def skip_reason(height: int, width: int, payload: str | bytes, min_votes: float = MIN_VOTES,
                method: str = "dwtDct") -> str | None:
    """Why `method` cannot mark an image of this size with this payload, or None when it can."""
    if method == "spread":
        return spread.skip_reason(height, width)
    return dwtdct.skip_reason(height, width, payload_bytes(payload), min_votes)


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


def _mark(rgb: np.ndarray, data: bytes, methods: tuple[str, ...], min_votes: float
          ) -> tuple[np.ndarray, list[str], list[str]]:
    """Embed each method that fits; returns the image, what was written and what was skipped (and why)."""
    height, width = rgb.shape[:2]
    out, done, skipped = rgb, [], []
    for method in methods:  # dwtDct first: spread measures its coefficients on the final pixels
        if method == "dwtDct":
            reason = dwtdct.skip_reason(height, width, data, min_votes)
            if reason is None:
                out = dwtdct.embed(out, data)
                done.append(dwtdct.status(height, width, data))
        else:
            reason = spread.skip_reason(height, width)
            if reason is None:
                out, grid = spread.embed(out, data)
                done.append(f"spread payload={data.decode('utf-8', 'replace')!r} grid={grid}x{grid}")
        if reason is not None:
            skipped.append(f"{method} skipped: {reason}" if len(methods) > 1 else reason)
    return out, done, skipped


def apply_watermark(images: Any, payload: str | bytes = SD_V1_PAYLOAD, *, method: str = "auto",
                    min_votes: float = MIN_VOTES, on_small: str = "warn") -> Any:
    """Mark each image with `payload`; returns the same form (PIL image, uint8 RGB array [H, W, 3] or
    [B, H, W, 3], or a list). `method`: "auto" (spread; plus dwtDct for SD_V1_PAYLOAD), "spread", "dwtDct" or
    "both". Images too small for every method follow the rule in the module docs: `on_small="warn"` (default)
    leaves them unchanged with a `WatermarkSkipped` warning, "ignore" does the same silently, "error" raises.
    PIL results carry what was done in `image.info["sdkit-watermark"]`."""
    if on_small not in ("warn", "ignore", "error"):
        raise ValueError(f"on_small={on_small!r}: use 'warn', 'ignore' or 'error'.")
    data = payload_bytes(payload)
    methods = methods_for(data, method)
    options = {"method": method, "min_votes": min_votes, "on_small": on_small}
    if isinstance(images, (list, tuple)):
        return [apply_watermark(image, data, **options) for image in images]
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return np.stack([apply_watermark(image, data, **options) for image in images])
    rgb = _as_rgb_array(images)
    out, done, skipped = _mark(rgb, data, methods, min_votes)
    if not done:
        reason = "; ".join(skipped)
        if on_small == "error":
            raise ValueError(f"Cannot watermark: {reason}. Use a larger image, a shorter payload, or "
                             "on_small='warn'.")
        if on_small == "warn":
            warnings.warn(f"Image saved without the invisible watermark: {reason}.", WatermarkSkipped, stacklevel=2)
        out = rgb.copy()
    if isinstance(images, Image.Image):
        result = Image.fromarray(np.ascontiguousarray(out))
        result.info.update(images.info)
        result.info[PNG_KEY] = "; ".join(done + skipped) if done else "skipped: " + "; ".join(skipped)
        return result
    return np.ascontiguousarray(out)


def detect_watermark(image: Any, payload: str | bytes, *, false_positive: float = FALSE_POSITIVE_RATE,
                     crops: bool = True) -> SpreadDetection:
    """Is `payload`'s spread mark in this image? `.found`, with `.score` against `.threshold` (set so that an
    unmarked image is found with probability <= `false_positive`), and where it matched (whole image or a crop;
    `crops=False` tests the whole image only, with the whole budget)."""
    return spread.detect(_as_rgb_array(image), payload_bytes(payload), false_positive, crops=crops)


def decode_watermark(image: Any, payload: str | bytes | None = SD_V1_PAYLOAD, *, n_bits: int | None = None
                     ) -> WatermarkReading:
    """Read a dwtDct watermark. Give the expected `payload` (its length sets the bits to read, and the reading
    reports `bit_accuracy`, `detected` and `matches`), or `payload=None, n_bits=...` to read an unknown one."""
    rgb = _as_rgb_array(image)
    expected = None if payload is None else payload_bytes(payload)
    n = 8 * len(expected) if expected is not None else n_bits
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0 or n % 8:
        raise ValueError("Say what to read: an expected payload, or n_bits (a positive multiple of 8; "
                         f"{payload_bits(SD_V1_PAYLOAD)} for {SD_V1_PAYLOAD!r}).")
    reading = dwtdct.read(rgb, int(n))
    reading.expected = expected
    return reading


def pnginfo(image: Image.Image) -> PngImagePlugin.PngInfo:
    """The PNG text chunks for an image returned by `apply_watermark` (its watermark record)."""
    info = PngImagePlugin.PngInfo()
    if PNG_KEY in image.info:
        info.add_text(PNG_KEY, image.info[PNG_KEY])
    return info


def save_png(image: Any, path: str | os.PathLike, payload: str | bytes | None = SD_V1_PAYLOAD, *,
             method: str = "auto", min_votes: float = MIN_VOTES, on_small: str = "warn") -> Image.Image:
    """Watermark (unless `payload` is None) and save as PNG with the "sdkit-watermark" text chunk."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(_as_rgb_array(image))
    if payload is not None:
        image = apply_watermark(image, payload, method=method, min_votes=min_votes, on_small=on_small)
    image.save(path, format="PNG", pnginfo=pnginfo(image))
    return image


# ------------------------------------------------------------------------------------------ reading files


def read_file(path: str | os.PathLike, payloads: tuple[str | bytes, ...] = KNOWN_PAYLOADS, *,
              method: str = "spread") -> tuple[str | None, list[tuple[str, str, Any]]]:
    """What `sdkit watermark decode FILE` reports: the file's "sdkit-watermark" record (if any) and, for each
    method ("spread", "dwtDct" or "all") and payload, (method, payload text, a SpreadDetection, a
    WatermarkReading, or the reason it cannot be read). Raises OSError (missing file, not an image)."""
    if method not in ("spread", "dwtDct", "all"):
        raise ValueError(f"method={method!r}: use 'spread', 'dwtDct' or 'all'.")
    data = [payload_bytes(p) for p in payloads]
    try:
        with Image.open(path) as image:
            image.load()
            record = image.info.get(PNG_KEY)
            rgb = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise OSError(f"{os.fspath(path)!r} is a folder, not an image file") from None
    except PermissionError as e:
        raise OSError(f"cannot open {os.fspath(path)!r}: {e.strerror}") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read {os.fspath(path)!r} as an image ({type(e).__name__}: {e})") from e
    results = []
    for name in ("spread", "dwtDct"):
        if method not in (name, "all"):
            continue
        for payload in data:
            text = payload.decode("utf-8", "replace")
            try:
                if name == "spread":
                    # each payload gets its share of the budget: the file's false-positive rate stays <= 1e-4
                    result = spread.detect(rgb, payload, FALSE_POSITIVE_RATE / len(data))
                else:
                    result = decode_watermark(rgb, payload)
            except ValueError as e:
                result = str(e)
            results.append((name, text, result))
    return record, results


def _line(name: str, text: str, result: Any) -> str:
    if isinstance(result, str):
        return f"  {name} {text!r}: cannot be read: {result}"
    if isinstance(result, SpreadDetection):
        return f"  {name} {text!r}: {result.describe()}"
    verdict = "FOUND (every bit)" if result.matches else "FOUND" if result.detected else "not found"
    return (f"  {name} {text!r} ({len(result.bits)} bits): {verdict}, bit accuracy {result.bit_accuracy:.3f} "
            f"(detection needs {detection_threshold(len(result.bits)):.3f}); read {result.payload!r}")


def decode_command(path: str | os.PathLike, payloads: list[str] | None = None, method: str = "spread") -> int:
    """Print what `read_file` finds; exit status 0 when a payload is found, 1 when none is, 2 on bad input."""
    try:
        record, results = read_file(path, tuple(payloads) if payloads else KNOWN_PAYLOADS, method=method)
    except FileNotFoundError:
        print(f"sdkit watermark decode: error: no such file: {os.fspath(path)}", file=sys.stderr)
        return 2
    except (OSError, TypeError, ValueError) as e:
        print(f"sdkit watermark decode: error: {e}", file=sys.stderr)
        return 2
    print(f"{os.fspath(path)}: record in file: {record or 'none'}")
    found = False
    for name, text, result in results:
        print(_line(name, text, result))
        found |= bool(getattr(result, "found", None) or getattr(result, "detected", None))
    print("watermark found" if found else "no watermark found")
    return 0 if found else 1
