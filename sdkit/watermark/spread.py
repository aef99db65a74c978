"""The kit's own watermark, "spread": a keyed ±1 pattern over a grid of cells, read by correlation.

Why this design (measured by benchmarks/watermark_robustness.py on the kit's own outputs; the table is in
benchmarks/results/watermark_robustness.txt). The kit's images are mostly flat: shapes on white or on one colour,
emoji, 64x64 pixels. invisible-watermark's methods quantise absolute transform values (dwtDct: one coefficient
per 4x4 block of the U channel's Haar LL band; dwtDctSvd: a singular value per block), so a flat white area
reads as all-0 or all-1 bits, JPEG and resizing move the quantisation cells, and the library refuses images
under 256x256. What survives flat images, JPEG, resizing and cropping is a *relative* mark spread over the whole
image, as in classic spread-spectrum watermarking (Cox et al. 1997):

- **Where.** The image is cut into a grid of G x G cells in relative coordinates (G = 16 below 256 pixels a side,
  32 from 256), so resizing, even to another aspect ratio, keeps every cell where it was. Each cell carries one
  key bit p = ±1, drawn from SHA-256 of the payload: the payload is the key, and detection asks "is this
  payload's pattern here?" (a zero-bit watermark: nothing is read out, a known payload is tested).
- **What is measured.** A cell's coefficient c is its mean luminance minus the mean of its 8 neighbours (a
  Laplacian on the cell grid): flat areas give c = 0, a uniform brightness or contrast change does not move
  the sign, and the band (a period of about two cells, 8 pixels at 64x64) is low enough for JPEG q75 and
  resizing to half to keep.
- **How it is embedded.** The same luminance change goes to R, G and B (colours are kept; dwtDct's U channel is
  untouched, so both marks can share an image). A base pattern of about one grey level, shaped like the
  detector's filter, then *informed embedding* (Cox, Miller & McKellips 1999): the embedder knows the image,
  so it measures c on the marked, rounded, clipped result and pushes each cell whose coefficient disagrees with
  its bit by less than REACH levels until it agrees by MARGIN levels (8 rounds). Cells dominated by the image
  (an edge 20 levels strong) are left alone rather than damaged. Clipping needs no headroom: on white, the
  positive half of the pattern clips away, but what remains (cells darker than their neighbours) is still a
  relative mark, and the rounds measure the clipped result and push until the margin holds.
- **How it is read, and the false-positive rate.** For each place the image might have come from (the whole
  image, or a crop; see CROP_SCALES), the detector computes the cells' coefficients c_b, weights them as
  a_b = c_b exp(-c_b^2 / 2 GAMMA^2) (cells near the embedding margin count, cells an edge dominates do not), and
  takes the score z = sum_b p_b a_b / ||a||. For an unmarked image, the weights a_b depend on the image only, and
  the key bits are independent fair signs, so by Hoeffding's inequality P(z >= t) <= exp(-t^2 / 2) whatever the
  image is. Each hypothesis h gets a share alpha_h of the false-positive budget alpha (half to the whole image,
  half spread evenly over the crops, over both grids: a union bound), and it is found when z_h >= t_h =
  sqrt(2 ln(1 / alpha_h)). So P(found | unmarked) <= sum_h alpha_h = alpha (1e-4 by default), without any
  assumption about image statistics; `tests/test_watermark.py` and the benchmark measure it on unmarked
  images too. A perfectly flat unmarked image gives a = 0 and z = 0.

Costs: about 42 dB PSNR on flat images (the informed rounds add most where an image has content), fractions of
a second to embed and to read (the crop search evaluates ~8,000 placements, vectorised).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np

METHOD = "spread"
VERSION = b"sdkit-spread-v1"  # part of the key derivation: changing it changes every pattern
GRIDS = (16, 32)  # cells per side: 16 below LARGE_SIDE pixels, 32 from LARGE_SIDE
LARGE_SIDE = 256
MIN_SIDE = 64  # cells of at least 4 pixels when embedding (a half-size copy still reads: 2-pixel cells)
AMPLITUDE = 1.0  # largest luminance change of the base pattern, grey levels of 255
MARGIN = 1.5  # informed embedding: every reachable cell agrees with its bit by this many grey levels
REACH = 6.0  # ... a cell is reachable when the image is against its bit by at most this many levels
ROUNDS = 8
GAMMA = 2.0  # the detector's weight: cells with |c| >> GAMMA are dominated by the image
EPSILON = 1e-6  # |c| below this (grey levels) is round-off, counted as 0
FALSE_POSITIVE_RATE = 1e-4
CROP_SCALES = tuple(1 - k / 32 for k in range(1, 17))  # side of a crop relative to the original: 31/32 ... 1/2
LUMA = np.array([0.299, 0.587, 0.114])


def grid_for(height: int, width: int) -> int:
    """Cells per side the embedder uses for an image of this size."""
    return GRIDS[1] if min(height, width) >= LARGE_SIDE else GRIDS[0]


def skip_reason(height: int, width: int) -> str | None:
    if min(height, width) < MIN_SIDE:
        return (f"a {width}x{height} image is below the spread watermark's minimum of {MIN_SIDE} pixels a side "
                f"(cells of at least 4 pixels)")
    return None


def key_pattern(payload: bytes, grid: int) -> np.ndarray:
    """The payload's ±1 bits for a grid x grid layout: SHA-256 in counter mode (stable across numpy versions)."""
    stream = b"".join(hashlib.sha256(b"%s|%d|%d|" % (VERSION, grid, i) + payload).digest()
                      for i in range(math.ceil(grid * grid / 256)))
    bits = np.unpackbits(np.frombuffer(stream, dtype=np.uint8))[: grid * grid]
    return (bits.astype(np.float64) * 2 - 1).reshape(grid, grid)


# ----------------------------------------------------------------------------------------------- the measure


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ LUMA


def _integral(y: np.ndarray) -> np.ndarray:
    s = np.zeros((y.shape[0] + 1, y.shape[1] + 1))
    s[1:, 1:] = y.cumsum(0).cumsum(1)
    return s


def _lerp_rows(s: np.ndarray, at: np.ndarray) -> np.ndarray:
    """s sampled at fractional row positions `at` (any shape), linear between rows: exact area integrals."""
    i = np.clip(np.floor(at).astype(int), 0, s.shape[0] - 2)
    f = (at - i).reshape(at.shape + (1,) * (s.ndim - 1))
    return s[i] * (1 - f) + s[i + 1] * f


def _box3(x: np.ndarray) -> np.ndarray:
    """Sums over 3x3 windows of the last two axes (zeros outside)."""
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
    rows = p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]
    return rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]


def _neighbour_mean(m: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the valid 8-neighbours over the last two axes, and how many there are."""
    mv, vv = np.where(valid, m, 0.0), valid.astype(np.float64)
    total, count = _box3(mv) - mv, _box3(vv) - vv
    return np.where(count > 0, total / np.maximum(count, 1), 0.0), count


def coefficients(integral: np.ndarray, grid: int, scale: float = 1.0, offsets_y=(0.0,), offsets_x=(0.0,)
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Cell coefficients c [n_y, n_x, grid, grid] and validity, for each placement of the original image's grid
    on this one: the image shows the original's region [o, o + scale] (relative units) on each axis. A cell
    counts when it lies wholly inside the image and has a valid neighbour."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    edges = np.arange(grid + 1) / grid
    ys = (edges[None, :] - np.asarray(offsets_y, dtype=np.float64)[:, None]) / scale * h  # [n_y, grid + 1]
    xs = (edges[None, :] - np.asarray(offsets_x, dtype=np.float64)[:, None]) / scale * w
    tol = 1e-6 * max(h, w)
    valid_y = (ys[:, :-1] >= -tol) & (ys[:, 1:] <= h + tol)
    valid_x = (xs[:, :-1] >= -tol) & (xs[:, 1:] <= w + tol)
    ys, xs = np.clip(ys, 0, h), np.clip(xs, 0, w)
    rows = _lerp_rows(integral, ys)  # [n_y, grid + 1, w + 1]
    corners = _lerp_rows(np.moveaxis(rows, -1, 0), xs)  # [n_x, grid + 1 (x), n_y, grid + 1 (y)]
    corners = corners.transpose(2, 0, 3, 1)  # [n_y, n_x, grid + 1 (y), grid + 1 (x)]
    sums = corners[..., 1:, 1:] - corners[..., :-1, 1:] - corners[..., 1:, :-1] + corners[..., :-1, :-1]
    area = np.diff(ys, axis=-1)[:, None, :, None] * np.diff(xs, axis=-1)[None, :, None, :]
    valid = valid_y[:, None, :, None] & valid_x[None, :, None, :] & (area > 0)
    means = np.where(valid, sums / np.maximum(area, 1e-12), 0.0)
    around, count = _neighbour_mean(means, valid)
    valid &= count > 0
    return np.where(valid, means - around, 0.0), valid


def _scores(c: np.ndarray, valid: np.ndarray, key: np.ndarray) -> np.ndarray:
    a = np.where(valid, c * np.exp(-c**2 / (2 * GAMMA**2)), 0.0)
    norm = np.sqrt((a**2).sum(axis=(-1, -2)))
    return np.where(norm > 0, (a * key).sum(axis=(-1, -2)) / np.maximum(norm, 1e-300), 0.0)


# ------------------------------------------------------------------------------------------------- embedding


def _upsample_weights(n_out: int, grid: int) -> np.ndarray:
    """Linear interpolation from cell centres to pixel centres, edges held (as cv2's INTER_LINEAR)."""
    pos = np.clip((np.arange(n_out) + 0.5) * grid / n_out - 0.5, 0, grid - 1)
    lo = np.minimum(np.floor(pos).astype(int), grid - 2)
    f = pos - lo
    weights = np.zeros((n_out, grid))
    weights[np.arange(n_out), lo] = 1 - f
    weights[np.arange(n_out), lo + 1] = f
    return weights


def embed(rgb: np.ndarray, payload: bytes) -> tuple[np.ndarray, int]:
    """Mark a uint8 RGB image [H, W, 3]; returns the marked image and the grid used."""
    h, w = rgb.shape[:2]
    grid = grid_for(h, w)
    key = key_pattern(payload, grid)
    wy, wx = _upsample_weights(h, grid), _upsample_weights(w, grid)
    everywhere = np.ones_like(key, dtype=bool)

    def delta(u):  # cell field -> luminance change: the field minus its neighbours' mean, interpolated
        return wy @ (u - _neighbour_mean(u, everywhere)[0]) @ wx.T

    base = rgb.astype(np.float64)
    host = coefficients(_integral(luminance(rgb)), grid)[0][0, 0]
    reachable = key * host >= -REACH
    u = AMPLITUDE * key / np.abs(delta(key)).max()
    for round_ in range(ROUNDS + 1):
        out = np.clip(np.rint(base + delta(u)[..., None]), 0, 255)
        if round_ == ROUNDS:
            break
        c = coefficients(_integral(luminance(out)), grid)[0][0, 0]
        short = np.where(reachable, np.maximum(0.0, MARGIN - key * c), 0.0)
        if short.max() < 0.05:
            break
        u = u + key * short
    return out.astype(np.uint8), grid


# ------------------------------------------------------------------------------------------------- detection


@dataclasses.dataclass
class SpreadDetection:
    """What `detect` found. `found` when some placement's score reaches its threshold; `p_value` is the
    family-wise bound for an unmarked image to score this high somewhere (compare with `false_positive`)."""
    payload: bytes
    found: bool
    score: float  # z of the best placement
    threshold: float  # t_h of that placement
    p_value: float
    grid: int
    crop: tuple[float, float, float] | None  # (scale, top, left) of the original, None for the whole image
    cells: int  # valid cells at the best placement
    hypotheses: int
    false_positive: float

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", "replace")

    def describe(self) -> str:
        rate = f"threshold set for a false-positive rate of {self.false_positive:.0e}"
        if not self.found:
            return f"not found: best score {self.score:.1f} (needs {self.threshold:.1f}; {rate})"
        where = "the whole image" if self.crop is None else \
            f"a {self.crop[0]:.0%} crop at ({self.crop[1]:.3f}, {self.crop[2]:.3f}) of the original"
        return (f"FOUND: score {self.score:.1f} (needs {self.threshold:.1f}; p <= {self.p_value:.1e}, {rate}); "
                f"matched on {where}, {self.grid}x{self.grid} grid, {self.cells} cells")


def _placements(grid: int) -> list[tuple[float, np.ndarray]]:
    """Crop hypotheses per scale: offsets every half cell, and the centred one."""
    out = []
    for scale in CROP_SCALES:
        step = 1 / (2 * grid)
        offsets = np.arange(0, 1 - scale + 1e-9, step)
        centre = (1 - scale) / 2
        if np.abs(offsets - centre).min() > 1e-9:
            offsets = np.sort(np.append(offsets, centre))
        out.append((scale, offsets))
    return out


def hypotheses_count() -> tuple[int, int]:
    """(whole-image hypotheses, crop hypotheses) over all grids."""
    crops = sum(len(offsets) ** 2 for grid in GRIDS for _, offsets in _placements(grid))
    return len(GRIDS), crops


def _trials(rgb: np.ndarray, false_positive: float, crops: bool):
    """Every placement tested, with the detector's normalised weights a / ||a|| (they do not depend on the key)
    and its threshold: (grid, scale, offsets, weights [n_y, n_x, grid, grid], cells [n_y, n_x], threshold)."""
    integral = _integral(luminance(rgb))
    n_whole, n_crops = hypotheses_count()
    budget_whole = false_positive / (2 * n_whole) if crops else false_positive / n_whole
    budget_crop = false_positive / (2 * n_crops)
    trials = [(grid, 1.0, np.zeros(1), budget_whole) for grid in GRIDS]  # the whole image first, both grids
    if crops:
        trials += [(grid, scale, offsets, budget_crop) for grid in GRIDS for scale, offsets in _placements(grid)]
    for grid, scale, offsets, budget in trials:
        c, valid = coefficients(integral, grid, scale, offsets, offsets)
        c = np.where(np.abs(c) < EPSILON, 0.0, c)  # float round-off in a flat area is not evidence
        a = np.where(valid, c * np.exp(-c**2 / (2 * GAMMA**2)), 0.0)
        norm = np.sqrt((a**2).sum(axis=(-1, -2), keepdims=True))
        a = np.where(norm > 0, a / np.maximum(norm, 1e-300), 0.0)
        yield grid, scale, offsets, a, valid.sum(axis=(-1, -2)), math.sqrt(2 * math.log(1 / budget))


def detect(rgb: np.ndarray, payload: bytes, false_positive: float = FALSE_POSITIVE_RATE, *, crops: bool = True
           ) -> SpreadDetection:
    """Test a uint8 RGB image for `payload`'s pattern; see the module docs for the threshold."""
    if not 0 < false_positive < 1:
        raise ValueError(f"false_positive={false_positive!r}: give a probability between 0 and 1.")
    keys = {grid: key_pattern(payload, grid) for grid in GRIDS}
    best = None
    for grid, scale, offsets, a, cells, threshold in _trials(rgb, false_positive, crops):
        z = (a * keys[grid]).sum(axis=(-1, -2))
        i, j = np.unravel_index(np.argmax(z), z.shape)
        score = float(z[i, j])
        # family-wise p-value: this placement's Hoeffding bound exp(-z^2/2) over the budget share it was given
        p_value = min(1.0, math.exp(-max(score, 0.0) ** 2 / 2 + threshold**2 / 2) * false_positive)
        if best is None or (p_value, -score) < (best[0], -best[1]):
            crop = None if scale == 1.0 else (scale, float(offsets[i]), float(offsets[j]))
            best = (p_value, score, threshold, grid, crop, int(cells[i, j]))
        if scale == 1.0 and best[1] >= best[2]:
            break  # found on the whole image: no need to search crops (the bound counts them anyway)
    p_value, score, threshold, grid, crop, cells = best
    n_whole, n_crops = hypotheses_count()
    return SpreadDetection(payload, score >= threshold, score, threshold, p_value, grid, crop, cells,
                           n_whole + (n_crops if crops else 0), false_positive)


def false_positives(rgb: np.ndarray, n_keys: int, seed: int = 0, false_positive: float = FALSE_POSITIVE_RATE
                    ) -> int:
    """How many of `n_keys` random keys (fair ±1 bits, as a payload's SHA-256 gives) `detect` would find in
    this image: its empirical false-positive count when the image does not carry them (benchmarks, tests)."""
    rng = np.random.default_rng(seed)
    keys = {grid: rng.choice([-1.0, 1.0], size=(n_keys, grid * grid)) for grid in GRIDS}
    found = np.zeros(n_keys, dtype=bool)
    for grid, _, _, a, _, threshold in _trials(rgb, false_positive, True):
        z = a.reshape(-1, grid * grid) @ keys[grid].T  # [placements, keys]
        found |= (z >= threshold).any(axis=0)
    return int(found.sum())
