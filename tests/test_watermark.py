"""Invisible watermark: the CompVis recipe, round trips, payload lengths, the small-image rule, the CLI."""
from __future__ import annotations

import math
import warnings

import cv2
import matplotlib.cbook
import numpy as np
import pytest
import pywt
from PIL import Image

from sdkit.cli import main
from sdkit.watermark import (
    PNG_KEY, SD_V1_PAYLOAD, SDKIT_PAYLOAD, WatermarkSkipped, apply_watermark, capacity, decode_watermark,
    detection_threshold, payload_bits, save_png, skip_reason,
)

imwatermark = pytest.importorskip("imwatermark")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """matplotlib's Grace Hopper photograph (ships with matplotlib) at 512x512, uint8 RGB."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return np.asarray(Image.open(path).convert("RGB").resize((512, 512), Image.LANCZOS))


def compvis_recipe(rgb: np.ndarray) -> np.ndarray:
    """scripts/txt2img.py's put_watermark, on a numpy RGB image."""
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bytes", "StableDiffusionV1".encode("utf-8"))
    bgr = encoder.encode(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), "dwtDct")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def test_same_pixels_as_the_compvis_recipe(photo):
    ours = apply_watermark(Image.fromarray(photo))
    assert np.array_equal(np.asarray(ours), compvis_recipe(photo))
    assert ours.info[PNG_KEY].startswith("dwtDct payload='StableDiffusionV1' bits=136")
    assert not np.array_equal(np.asarray(ours), photo)  # it did change the image
    assert np.abs(np.asarray(ours).astype(int) - photo).mean() < 2  # ... invisibly


@pytest.mark.parametrize("payload", [SD_V1_PAYLOAD, SDKIT_PAYLOAD])
def test_round_trip_512_through_png(photo, tmp_path, payload):
    path = tmp_path / "out.png"
    save_png(photo, path, payload=payload)
    with Image.open(path) as saved:
        assert saved.info[PNG_KEY].startswith(f"dwtDct payload={payload!r}")
        reading = decode_watermark(saved, payload)
    assert reading.matches and reading.text == payload and reading.bit_accuracy == 1.0 and reading.detected
    # The reference decoder (SD's scripts/tests/test_watermark.py) reads the same bytes.
    with Image.open(path) as saved:
        bgr = cv2.cvtColor(np.asarray(saved.convert("RGB")), cv2.COLOR_RGB2BGR)
    assert imwatermark.WatermarkDecoder("bytes", payload_bits(payload)).decode(bgr, "dwtDct") == payload.encode()


def test_unmarked_image_is_not_detected(photo):
    for payload in (SD_V1_PAYLOAD, SDKIT_PAYLOAD):
        reading = decode_watermark(photo, payload)
        assert not reading.detected and not reading.matches and 0.3 < reading.bit_accuracy < 0.7


def test_payload_lengths_and_capacity():
    assert payload_bits(SD_V1_PAYLOAD) == 136 == 8 * len("StableDiffusionV1")  # WatermarkDecoder('bytes', 136)
    assert payload_bits(SDKIT_PAYLOAD) == 40 and payload_bits("é") == 16  # UTF-8 bytes
    for h, w in [(512, 512), (64, 64), (300, 517), (257, 255)]:
        # Independent count: 4x4 blocks in the Haar LL band of the 4-aligned crop, as dwtDct walks them.
        ll, _ = pywt.dwt2(np.zeros((h // 4 * 4, w // 4 * 4)), "haar")
        assert capacity(h, w) == (ll.shape[0] // 4) * (ll.shape[1] // 4)
    assert capacity(512, 512) == 4096


def test_detection_threshold_closed_form():
    for n in (40, 136):
        k = round(detection_threshold(n) * n)
        tail = lambda j: sum(math.comb(n, i) for i in range(j, n + 1)) / 2**n  # noqa: E731
        assert tail(k) <= 1e-4 < tail(k - 1)
    assert detection_threshold(40) == 0.8


def test_64x64_is_skipped_warned_and_recorded(tmp_path):
    small = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    assert "below invisible-watermark's minimum of 256x256" in skip_reason(64, 64, SDKIT_PAYLOAD)
    with pytest.warns(WatermarkSkipped, match="64x64 image is below"):
        out = apply_watermark(Image.fromarray(small), SDKIT_PAYLOAD)
    assert np.array_equal(np.asarray(out), small)  # unchanged, not half-stamped
    assert out.info[PNG_KEY].startswith("skipped: a 64x64 image")

    path = tmp_path / "small.png"
    with pytest.warns(WatermarkSkipped):
        save_png(small, path, payload=SDKIT_PAYLOAD)
    with Image.open(path) as saved:  # the record travels in the file, as a tEXt chunk
        assert saved.text[PNG_KEY].startswith("skipped:")

    with pytest.raises(ValueError, match="Cannot watermark: a 64x64 image"):
        apply_watermark(small, on_small="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(apply_watermark(small, on_small="ignore"), small)
    # Reading: the 40-bit payload fits the 64 slots (a reading comes back); the 136-bit one cannot.
    assert decode_watermark(small, SDKIT_PAYLOAD).bits.shape == (40,)
    with pytest.raises(ValueError, match="64 dwtDct bit slots, fewer than the 136 bits"):
        decode_watermark(small, SD_V1_PAYLOAD)


def test_size_rule_boundaries(photo):
    assert skip_reason(256, 256, SD_V1_PAYLOAD) is None  # the library's minimum is embedded
    assert skip_reason(255, 256, SD_V1_PAYLOAD) is not None
    long_payload = "x" * 200  # 1600 bits > 1024 slots of a 256x256 image
    assert "1024 bit slots" in skip_reason(256, 256, long_payload)
    with pytest.warns(WatermarkSkipped, match="1024 bit slots"):
        apply_watermark(photo[:256, :256], long_payload)
    assert skip_reason(256, 256, SDKIT_PAYLOAD, min_votes=30) is not None  # 25.6 votes per bit


def test_input_forms(photo):
    batch = np.stack([photo, photo[::-1].copy()])
    out = apply_watermark(batch)
    assert out.shape == batch.shape and out.dtype == np.uint8
    assert np.array_equal(out[0], compvis_recipe(photo))
    assert [type(x) for x in apply_watermark([Image.fromarray(photo), photo])] == [Image.Image, np.ndarray]
    with pytest.raises(TypeError, match="uint8 RGB array"):
        apply_watermark(photo.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="n_bits"):
        decode_watermark(photo, None)
    assert decode_watermark(apply_watermark(photo), None, n_bits=136).text == SD_V1_PAYLOAD


def test_cli_decode(photo, tmp_path, capsys):
    save_png(photo, tmp_path / "sd.png")
    assert main(["watermark", "decode", str(tmp_path / "sd.png")]) == 0
    out = capsys.readouterr().out
    assert "record in file: dwtDct payload='StableDiffusionV1'" in out
    assert "'StableDiffusionV1' (136 bits): exact" in out

    Image.fromarray(photo).save(tmp_path / "plain.png")
    assert main(["watermark", "decode", str(tmp_path / "plain.png"), "--payload", "sdkit"]) == 1
    assert "'sdkit' (40 bits): not found" in capsys.readouterr().out

    with pytest.warns(WatermarkSkipped):
        save_png(photo[:64, :64], tmp_path / "small.png", payload=SDKIT_PAYLOAD)
    assert main(["watermark", "decode", str(tmp_path / "small.png")]) == 1
    out = capsys.readouterr().out
    assert "record in file: skipped: a 64x64 image" in out and "cannot be read" in out
    assert main(["watermark", "decode", str(tmp_path / "missing.png")]) == 2
