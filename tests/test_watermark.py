"""Invisible watermarks: the kit's `spread` mark on the kit's own images (flat, 64x64) through PNG, JPEG, resizing
and cropping; its false-positive bound; SD v1's exact dwtDct path; payload and file errors; the CLI."""
from __future__ import annotations

import io
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
    PNG_KEY,
    SD_V1_PAYLOAD,
    SDKIT_PAYLOAD,
    WatermarkSkipped,
    apply_watermark,
    capacity,
    decode_watermark,
    detect_watermark,
    detection_threshold,
    payload_bits,
    save_png,
    skip_reason,
    spread,
)

imwatermark = pytest.importorskip("imwatermark")

KIT_PROMPTS = ["a red circle", "a blue square on a light green background", "a crocodile, openmoji style"]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """matplotlib's Grace Hopper photograph (ships with matplotlib) at 512x512, uint8 RGB: a textured image."""
    path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return np.asarray(Image.open(path).convert("RGB").resize((512, 512), Image.LANCZOS))


@pytest.fixture(scope="module")
def kit_images() -> list[Image.Image]:
    """The kit's own outputs: the shipped tiny model at 64x64 (shapes on white, on a colour, an emoji), unmarked."""
    import sdkit
    from sdkit.pipelines import txt2img

    model = sdkit.load_model("tiny")
    return txt2img(model, KIT_PROMPTS, steps=4, seed=0, progress=False).images


def flat(colour, size=64) -> np.ndarray:
    return np.full((size, size, 3), colour, dtype=np.uint8)


def jpeg(rgb, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb)).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def half(rgb) -> np.ndarray:
    rgb = np.asarray(rgb)
    return np.asarray(Image.fromarray(rgb).resize((rgb.shape[1] // 2, rgb.shape[0] // 2), Image.LANCZOS))


def centre_crop(rgb, fraction=0.75) -> np.ndarray:
    rgb = np.asarray(rgb)
    side = round(rgb.shape[0] * fraction)
    top = (rgb.shape[0] - side) // 2
    return rgb[top:top + side, top:top + side]


def psnr(a, b) -> float:
    return 10 * math.log10(255**2 / np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b)) ** 2))


# ------------------------------------------------------------------------------------ the kit's default: spread


def test_round_trip_on_the_kits_own_images(kit_images, tmp_path):
    for i, image in enumerate(kit_images):
        path = tmp_path / f"{i}.png"
        saved = save_png(image, path, payload=SDKIT_PAYLOAD)
        assert saved.info[PNG_KEY] == "spread payload='sdkit' grid=16x16"
        assert psnr(image, saved) > 38  # invisible: about 1-2 grey levels
        with Image.open(path) as reread:
            assert reread.text[PNG_KEY].startswith("spread")
            found = detect_watermark(reread, SDKIT_PAYLOAD)
        assert found.found and found.crop is None and found.score > 1.5 * found.threshold, found.describe()
        assert not detect_watermark(reread, SD_V1_PAYLOAD).found  # another payload's key is not there
        assert not detect_watermark(image, SDKIT_PAYLOAD).found  # nor in the unmarked image


@pytest.mark.parametrize("colour", [(255, 255, 255), (0, 0, 0), (180, 220, 170)])
def test_flat_images_keep_the_mark_through_jpeg_resize_and_crop(colour):
    """White and black clip one half of the pattern; the relative (cell vs neighbours) measure still reads."""
    marked = apply_watermark(flat(colour), SDKIT_PAYLOAD)
    assert not np.array_equal(marked, flat(colour)) and psnr(flat(colour), marked) > 40
    copies = {"JPEG q75": jpeg(marked, 75), "half": half(marked), "JPEG q75 of half": jpeg(half(marked), 75),
              "centre crop 75%": centre_crop(marked)}
    for name, copy in copies.items():
        result = detect_watermark(copy, SDKIT_PAYLOAD)
        assert result.found, f"{name}: {result.describe()}"
    assert detect_watermark(centre_crop(marked), SDKIT_PAYLOAD).crop == (0.75, 0.125, 0.125)


def test_a_kit_image_keeps_the_mark_through_jpeg_and_resize(kit_images):
    marked = apply_watermark(kit_images[1], SDKIT_PAYLOAD)  # a blue square on a light green background
    assert detect_watermark(jpeg(marked, 75), SDKIT_PAYLOAD).found
    assert detect_watermark(half(marked), SDKIT_PAYLOAD).found


def test_unmarked_images_are_not_found(kit_images, photo):
    rng = np.random.default_rng(0)
    unmarked = [np.asarray(im) for im in kit_images] + [
        flat((255, 255, 255)), flat((30, 90, 200), 96), photo[:128, :128], jpeg(photo, 75)[::4, ::4],
        rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)]
    for i, image in enumerate(unmarked):
        for payload in (SDKIT_PAYLOAD, SD_V1_PAYLOAD)[:2 if i < 2 else 1]:
            result = detect_watermark(image, payload)
            assert not result.found and result.p_value > 1e-4, result.describe()
    assert detect_watermark(flat((255, 255, 255)), SDKIT_PAYLOAD).score == 0  # no contrast, no evidence


def test_false_positive_bound_and_an_empirical_check(kit_images):
    """Hoeffding: for weights fixed by the image and fair random key signs, P(z >= t) <= exp(-t^2/2); the
    thresholds spend half the budget on the whole image (two grids) and half on the crop placements."""
    n_whole, n_crops = spread.hypotheses_count()
    assert n_whole == 2 and n_crops > 1000
    result = detect_watermark(flat(128), SDKIT_PAYLOAD)
    assert result.hypotheses == n_whole + n_crops
    assert result.threshold == pytest.approx(math.sqrt(2 * math.log(2 * n_whole / 1e-4)))  # whole image
    assert detect_watermark(flat(128), SDKIT_PAYLOAD, crops=False).threshold == pytest.approx(
        math.sqrt(2 * math.log(n_whole / 1e-4)))  # no crop search: the whole budget on the two grids
    # Empirical: random keys on unmarked kit images and on a JPEG copy; none may be found.
    image = np.asarray(kit_images[2])
    assert spread.false_positives(image, 200) == 0 and spread.false_positives(jpeg(image, 75), 100) == 0
    # The whole-image score of an unmarked image over random keys has mean 0 and variance <= 1.
    rng = np.random.default_rng(1)
    trials = list(spread._trials(image, 1e-4, crops=False))
    weights = trials[0][3].reshape(-1)
    z = rng.choice([-1.0, 1.0], size=(2000, weights.size)) @ weights
    assert abs(z.mean()) < 0.1 and 0.9 < z.var() < 1.1


def test_the_key_is_stable():
    """The key pattern comes from SHA-256, not numpy's generators: files marked today read the same tomorrow."""
    key = spread.key_pattern(b"sdkit", 16)
    assert key.shape == (16, 16) and set(np.unique(key)) == {-1.0, 1.0}
    bits = "".join("1" if v > 0 else "0" for v in key.reshape(-1)[:24])
    assert bits == "".join(format(b, "08b") for b in __import__("hashlib").sha256(
        b"sdkit-spread-v1|16|0|sdkit").digest()[:3])
    assert not np.array_equal(key, spread.key_pattern(b"sdkit!", 16))


def test_size_rule_and_grids():
    assert spread.grid_for(64, 64) == 16 and spread.grid_for(255, 4000) == 16 and spread.grid_for(256, 256) == 32
    small = flat(200, 32)
    with pytest.warns(WatermarkSkipped, match="32x32 image is below the spread watermark's minimum of 64"):
        out = apply_watermark(Image.fromarray(small), SDKIT_PAYLOAD)
    assert np.array_equal(np.asarray(out), small) and out.info[PNG_KEY].startswith("skipped: a 32x32 image")
    with pytest.raises(ValueError, match="Cannot watermark"):
        apply_watermark(small, SDKIT_PAYLOAD, on_small="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = apply_watermark(Image.fromarray(flat(200, 64)), SD_V1_PAYLOAD)  # auto: spread, dwtDct skipped quietly
    assert out.info[PNG_KEY].startswith("spread payload='StableDiffusionV1' grid=16x16; dwtDct skipped: a 64x64")
    wide = apply_watermark(flat(255, 300)[:100], SDKIT_PAYLOAD)  # 300x100: relative cells, not square
    assert detect_watermark(wide, SDKIT_PAYLOAD).found
    assert detect_watermark(np.asarray(Image.fromarray(wide).resize((150, 80))), SDKIT_PAYLOAD).found


# -------------------------------------------------------------------------------------- SD v1's dwtDct path


def compvis_recipe(rgb: np.ndarray) -> np.ndarray:
    """scripts/txt2img.py's put_watermark, on a numpy RGB image."""
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bytes", b"StableDiffusionV1")
    bgr = encoder.encode(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), "dwtDct")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def reference_decode(rgb: np.ndarray, payload: str) -> bytes:
    """SD's scripts/tests/test_watermark.py."""
    bgr = cv2.cvtColor(np.asarray(rgb), cv2.COLOR_RGB2BGR)
    return imwatermark.WatermarkDecoder("bytes", payload_bits(payload)).decode(bgr, "dwtDct")


def test_dwtdct_gives_the_compvis_pixels(photo):
    ours = apply_watermark(Image.fromarray(photo), method="dwtDct")
    assert np.array_equal(np.asarray(ours), compvis_recipe(photo))
    assert ours.info[PNG_KEY].startswith("dwtDct payload='StableDiffusionV1' bits=136")
    assert not np.array_equal(np.asarray(ours), photo)
    assert np.abs(np.asarray(ours).astype(int) - photo).mean() < 2


def test_sd_payload_by_default_carries_both_marks_and_the_reference_decoder_reads_it(photo, tmp_path):
    path = tmp_path / "sd.png"
    save_png(photo, path)  # the default payload is SD v1's; "auto" writes dwtDct and spread
    with Image.open(path) as saved:
        record, rgb = saved.info[PNG_KEY], np.asarray(saved.convert("RGB"))
    assert record.startswith("dwtDct payload='StableDiffusionV1' bits=136") and "; spread payload=" in record
    reading = decode_watermark(rgb, SD_V1_PAYLOAD)
    assert reading.matches and reading.text == SD_V1_PAYLOAD and reading.detected
    assert reference_decode(rgb, SD_V1_PAYLOAD) == SD_V1_PAYLOAD.encode()  # spread (luminance) leaves U alone
    assert detect_watermark(rgb, SD_V1_PAYLOAD).found and detect_watermark(jpeg(rgb, 75), SD_V1_PAYLOAD).found


@pytest.mark.parametrize("payload", [SD_V1_PAYLOAD, SDKIT_PAYLOAD])
def test_dwtdct_round_trip_on_a_textured_image(photo, payload):
    marked = apply_watermark(photo, payload, method="dwtDct")
    assert decode_watermark(marked, payload).matches
    assert reference_decode(marked, payload) == payload.encode()
    assert not decode_watermark(photo, payload).detected


def test_dwtdct_payload_lengths_capacity_and_threshold():
    assert payload_bits(SD_V1_PAYLOAD) == 136 and payload_bits(SDKIT_PAYLOAD) == 40 and payload_bits("é") == 16
    for h, w in [(512, 512), (64, 64), (300, 517), (257, 255)]:
        ll, _ = pywt.dwt2(np.zeros((h // 4 * 4, w // 4 * 4)), "haar")  # independent count of dwtDct's blocks
        assert capacity(h, w) == (ll.shape[0] // 4) * (ll.shape[1] // 4)
    def tail(n, j):  # P(Binomial(n, 1/2) >= j)
        return sum(math.comb(n, i) for i in range(j, n + 1)) / 2**n

    for n in (40, 136):
        k = round(detection_threshold(n) * n)
        assert tail(n, k) <= 1e-4 < tail(n, k - 1)
    assert skip_reason(256, 256, SD_V1_PAYLOAD) is None and skip_reason(255, 256, SD_V1_PAYLOAD) is not None
    assert "1024 bit slots" in skip_reason(256, 256, "x" * 200)
    with pytest.warns(WatermarkSkipped, match="below invisible-watermark's minimum of 256x256"):
        apply_watermark(flat(255), SD_V1_PAYLOAD, method="dwtDct")
    with pytest.raises(ValueError, match="64 dwtDct bit slots, fewer than the 136 bits"):
        decode_watermark(flat(255), SD_V1_PAYLOAD)


# ------------------------------------------------------------------------------------------- inputs and errors


@pytest.mark.parametrize("payload", [123, 1.5, True, None, ["sdkit"]])
def test_payloads_that_are_not_text_are_refused(payload):
    with pytest.raises(TypeError, match=r"payload is text \(str\) or bytes"):
        apply_watermark(flat(255), payload)
    with pytest.raises(TypeError, match=r"payload is text \(str\) or bytes"):
        detect_watermark(flat(255), payload)


def test_empty_or_broken_payloads_and_methods_are_refused(tmp_path):
    for payload in ("", b""):
        with pytest.raises(ValueError, match="payload is empty"):
            apply_watermark(flat(255), payload)
    with pytest.raises(ValueError, match="not valid text"):
        apply_watermark(flat(255), "\ud800")
    with pytest.raises(ValueError, match="method='dct'"):
        apply_watermark(flat(255), SDKIT_PAYLOAD, method="dct")
    with pytest.raises(TypeError, match=r"payload is text"):
        save_png(flat(255), tmp_path / "x.png", payload=7)
    assert apply_watermark(flat(255), b"sdkit").shape == (64, 64, 3)  # bytes are fine


def test_input_forms(photo):
    batch = np.stack([photo, photo[::-1].copy()])
    out = apply_watermark(batch, method="dwtDct")
    assert out.shape == batch.shape and out.dtype == np.uint8 and np.array_equal(out[0], compvis_recipe(photo))
    assert [type(x) for x in apply_watermark([Image.fromarray(photo), photo])] == [Image.Image, np.ndarray]
    with pytest.raises(TypeError, match="uint8 RGB array"):
        apply_watermark(photo.astype(np.float32) / 255)
    with pytest.raises(TypeError, match="uint8 RGB array"):
        detect_watermark(photo[..., 0], SDKIT_PAYLOAD)
    with pytest.raises(ValueError, match="n_bits"):
        decode_watermark(photo, None)
    assert decode_watermark(apply_watermark(photo, method="dwtDct"), None, n_bits=136).text == SD_V1_PAYLOAD


# -------------------------------------------------------------------------------------------------- the CLI


def test_cli_decode(photo, kit_images, tmp_path, capsys):
    save_png(kit_images[0], tmp_path / "kit.png", payload=SDKIT_PAYLOAD)
    assert main(["watermark", "decode", str(tmp_path / "kit.png")]) == 0
    out = capsys.readouterr().out
    assert "record in file: spread payload='sdkit'" in out and "spread 'sdkit': FOUND" in out
    assert "spread 'StableDiffusionV1': not found" in out and out.rstrip().endswith("watermark found")

    Image.fromarray(jpeg(half(apply_watermark(kit_images[0], SDKIT_PAYLOAD)), 75)).save(tmp_path / "copy.jpg")
    assert main(["watermark", "decode", str(tmp_path / "copy.jpg")]) == 0  # a JPEG of a half-size copy
    assert "spread 'sdkit': FOUND" in capsys.readouterr().out

    kit_images[0].save(tmp_path / "plain.png")
    assert main(["watermark", "decode", str(tmp_path / "plain.png"), "--payload", "sdkit"]) == 1
    out = capsys.readouterr().out
    assert "spread 'sdkit': not found" in out and "no watermark found" in out

    save_png(photo, tmp_path / "sd.png")  # SD v1's path, read as the reference decoder would
    assert main(["watermark", "decode", str(tmp_path / "sd.png"), "--method", "dwtDct"]) == 0
    out = capsys.readouterr().out
    assert "dwtDct 'StableDiffusionV1' (136 bits): FOUND (every bit)" in out and "spread" not in out.split("\n", 1)[1]
    assert main(["watermark", "decode", str(tmp_path / "sd.png"), "--method", "all"]) == 0
    out = capsys.readouterr().out
    assert "spread 'StableDiffusionV1': FOUND" in out and "dwtDct 'StableDiffusionV1' (136 bits): FOUND" in out


def test_cli_decode_bad_inputs_get_one_line_on_stderr(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    cases = {"missing.png": "no such file", "notes.txt": "cannot read", "truncated.png": "cannot read",
             ".": "is a folder"}
    for name, words in cases.items():
        assert main(["watermark", "decode", str(tmp_path / name)]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured
        assert captured.err.startswith("sdkit watermark decode: error: ") and words in captured.err
        assert "Traceback" not in captured.err
    Image.fromarray(flat(255)).save(tmp_path / "ok.png")
    assert main(["watermark", "decode", str(tmp_path / "ok.png"), "--payload", ""]) == 2
    assert "payload is empty" in capsys.readouterr().err
