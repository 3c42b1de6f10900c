"""Tissue texture (smooth, anatomy-fixed) and quantum noise (per acquisition).

The texture is a low-pass random field defined on a fixed 3 mm lattice in patient mm and linearly interpolated to
the requested grid: the same patient has the same liver mottling at 32 or 300 slices.  Quantum noise is white noise
softened in-plane by a [1 2 1] kernel (CT noise is not white: the reconstruction kernel removes the highest
frequencies) and rescaled to the requested standard deviation.

Everything works slice by slice: whole-volume temporaries at 300x512x512 cost more in page faults than in arithmetic.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from .geometry import Grid

LATTICE_MM = 3.0
NOISE_BANK_ABOVE = 16 * 1024 * 1024  # voxels; larger volumes draw noise from a bank of slices (see add_quantum_noise)


def _weights(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.clip(coords, 0, n - 1.001)
    i0 = np.floor(c).astype(np.intp)
    return i0, (c - i0).astype(np.float32)


class TextureField:
    """Unit-variance low-pass field (correlation ~4 mm) in patient mm, sampled slice by slice on ``grid``."""

    def __init__(self, grid: Grid, rng: np.random.Generator, extent: np.ndarray):
        ext = np.asarray(extent, float)
        lo = ext[:, 0]
        n = np.ceil((ext[:, 1] - lo) / LATTICE_MM).astype(int) + 2
        coarse = rng.standard_normal((n[2], n[1], n[0]), dtype=np.float32)  # (z, y, x)
        coarse = gaussian_filter(coarse, 0.8, mode="wrap", truncate=2.5)
        coarse /= coarse.std() + 1e-6
        self.coarse = coarse
        self.grid = grid
        self.ix = _weights((grid.xs - lo[0]) / LATTICE_MM, n[0])
        self.iy = _weights((grid.ys - lo[1]) / LATTICE_MM, n[1])
        self.iz = _weights((grid.zs - lo[2]) / LATTICE_MM, n[2])

    def plane(self, k: int) -> np.ndarray:
        """(ny, nx) field at slice k."""
        i0, w = self.iz[0][k], self.iz[1][k]
        c = self.coarse[i0] * (1 - w) + self.coarse[i0 + 1] * w  # (nyc, nxc)
        iy, wy = self.iy
        c = c[iy] * (1 - wy)[:, None] + c[iy + 1] * wy[:, None]  # (ny, nxc)
        ix, wx = self.ix
        return c[:, ix] * (1 - wx) + c[:, ix + 1] * wx

    def volume(self) -> np.ndarray:
        out = np.empty(self.grid.shape, np.float32)
        for k in range(self.grid.shape[0]):
            out[k] = self.plane(k)
        return out


def apply_texture(hu: np.ndarray, labels: np.ndarray, field: TextureField, amplitude_lut: np.ndarray) -> None:
    """In place: hu += amplitude_lut[label] * field (tissue-specific mottling)."""
    for k in range(hu.shape[0]):
        hu[k] += amplitude_lut[labels[k]] * field.plane(k)


def _smooth121(noise: np.ndarray) -> np.ndarray:
    """[1 2 1]/4 along x then y of a (..., ny, nx) block, rescaled to unit variance."""
    sm = noise * 0.5
    sm[..., :, 1:] += noise[..., :, :-1] * 0.25
    sm[..., :, :-1] += noise[..., :, 1:] * 0.25
    out = sm * 0.5
    out[..., 1:, :] += sm[..., :-1, :] * 0.25
    out[..., :-1, :] += sm[..., 1:, :] * 0.25
    out *= np.float32(16.0 / 6.0)  # variance of the separable kernel: (6/16)^2
    return out


def add_quantum_noise(hu: np.ndarray, sigma: float, rng: np.random.Generator) -> None:
    """In place: hu += correlated Gaussian noise of standard deviation ``sigma`` HU.

    Volumes up to 16 M voxels get independent noise in every slice.  Larger ones (300x512x512) take each slice's
    noise from a bank of 32 independent slices, randomly rolled and flipped per slice: drawing 78 M normals costs
    ~1.5 s here, the bank ~0.1 s, and a rolled/flipped noise field is statistically the same noise."""
    if sigma <= 0:
        return
    nz, ny, nx = hu.shape
    scale = np.float32(sigma)
    if hu.size <= NOISE_BANK_ABOVE:
        step = max(1, (1 << 19) // (ny * nx))
        for z0 in range(0, nz, step):
            block = _smooth121(rng.standard_normal((min(step, nz - z0), ny, nx), dtype=np.float32))
            block *= scale
            hu[z0:z0 + step] += block
        return
    bank = _smooth121(rng.standard_normal((32, ny, nx), dtype=np.float32))
    bank *= scale
    picks = rng.integers(0, 32, nz)
    shifts = rng.integers(0, [ny, nx], (nz, 2))
    flips = rng.integers(0, 4, nz)
    for k in range(nz):
        n = np.roll(bank[picks[k]], tuple(shifts[k]), axis=(0, 1))
        if flips[k] & 1:
            n = n[::-1]
        if flips[k] & 2:
            n = n[:, ::-1]
        hu[k] += n
