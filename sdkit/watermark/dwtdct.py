"""SD v1's watermark: invisible-watermark's `dwtDct` with the payload "StableDiffusionV1", exactly as CompVis did.

SD v1's txt2img ran `WatermarkEncoder().set_watermark('bytes', b"StableDiffusionV1")` and `encode(bgr, 'dwtDct')`
on every saved image; its test decoded 136 bits (17 bytes). `apply_watermark(image, method="dwtDct")` gives the
same pixels, and the reference decoder reads them. The kit's default mark is `spread` (spread.py); for the SD
payload both are written (they live in different channels: dwtDct in U, spread in luminance).

How dwtDct works (invisible-watermark 0.2.0): RGB -> YUV; a one-level Haar DWT of the U channel (Y has scale 0
and the channel loop never reaches V); the LL band is cut into 4x4 blocks, and in each block the largest value
other than the first is quantised with step 36 to an odd or even half-step: one payload bit per block, the
payload repeated over all blocks in raster order. Decoding takes the majority vote for each bit. An image
therefore has `capacity(h, w) = (h // 8) * (w // 8)` bit slots: 4096 at 512x512, 30 votes per SD bit.

What to expect (benchmarks/results/watermark_robustness.txt): despite its name no DCT is taken
(ShieldMnt/invisible-watermark#39), so each bit sits on a raw LL value among near-equal neighbours, one of which
often becomes the largest after embedding: even a lossless round trip reads some bits wrong. Textured images read
back well after PNG; images with large white or saturated areas (the kit's shapes and emoji) do not: the U-channel
change is clipped away there (an all-white image keeps none of it; the invisible-watermark README lists
homogeneous backgrounds as a known defect). JPEG, resizing and cropping remove the mark. So
`WatermarkReading.detected` (a bit accuracy that an unmarked image reaches with probability 1e-4) is the useful
test; `matches` (all bits) is strict.

The rule for small images (deliberate): dwtDct is embedded when invisible-watermark accepts the image (at least
256x256 pixels) and every payload bit gets at least `min_votes` slots (default 1: the payload fits once).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

METHOD = "dwtDct"
LIBRARY_MIN_PIXELS = 256 * 256  # invisible-watermark refuses smaller images
MIN_VOTES = 1  # bit slots per payload bit below which the mark is skipped (1: the payload must fit once)
FALSE_POSITIVE_RATE = 1e-4  # for `detected`: how often an unmarked image may pass


def payload_bits(payload: bytes) -> int:
    """Bits needed for a payload (8 per byte)."""
    return 8 * len(payload)


def capacity(height: int, width: int) -> int:
    """Bit slots dwtDct has in an image: 4x4 blocks in the Haar LL band of the 4-aligned crop."""
    return (height // 8) * (width // 8)


def skip_reason(height: int, width: int, payload: bytes, min_votes: float = MIN_VOTES) -> str | None:
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


def status(height: int, width: int, payload: bytes) -> str:
    bits = payload_bits(payload)
    name = payload.decode("utf-8", "replace")
    return f"dwtDct payload={name!r} bits={bits} votes_per_bit={capacity(height, width) / bits:.1f}"


def embed(rgb: np.ndarray, payload: bytes) -> np.ndarray:
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", payload)
    return encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")[:, :, ::-1]  # it works on BGR


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


def read(rgb: np.ndarray, n_bits: int) -> WatermarkReading:
    """The majority vote for each of n_bits bits (a multiple of 8) in a uint8 RGB image."""
    slots = capacity(*rgb.shape[:2])
    if slots < n_bits:
        raise ValueError(f"A {rgb.shape[1]}x{rgb.shape[0]} image has {slots} dwtDct bit slots, fewer than the "
                         f"{n_bits} bits asked for: it cannot hold this watermark.")
    from imwatermark.maxDct import EmbedMaxDct

    # WatermarkDecoder.decode(bgr, 'dwtDct') is exactly this call behind a 256x256 size guard; calling the
    # algorithm directly also reads crops and downscaled copies of watermarked images.
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    bits = np.asarray(EmbedMaxDct(watermarks=[], wmLen=n_bits).decode(bgr), dtype=bool)
    return WatermarkReading(bits, np.packbits(bits).tobytes())
