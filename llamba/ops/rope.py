"""Rotary position embeddings: tables of cos/sin per position (NumPy), applied to a head in place (Numba,
inlined into heads.split_heads).

Two layouts: NORM rotates adjacent pairs (x[2i], x[2i+1]) - llama's converter permutes Q/K for it; NEOX
rotates the halves (x[i], x[i + n_rot/2]) - Qwen and Gemma. Frequency scalings follow llama.cpp: linear
(positions divided by the factor), YaRN (a ramp between interpolated and extrapolated frequencies plus an
attention-magnitude correction), and llama3's wavelength bands.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .jit import kernel


@dataclass(frozen=True)
class RopeConfig:
    n_rot: int  # rotated dimensions per head (<= head_dim)
    base: float = 10000.0
    neox: bool = False
    scaling: str = "none"  # none | linear | yarn | llama3
    factor: float = 1.0  # context extension factor (freq_scale = 1 / factor)
    n_ctx_orig: int = 0  # the training context, for YaRN and llama3
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_ext_factor: float = 1.0
    yarn_attn_factor: float = 1.0
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    freq_factors: tuple[float, ...] | None = None  # per-frequency divisors shipped as rope_freqs.weight


def inverse_frequencies(cfg: RopeConfig) -> np.ndarray:
    """theta_i = base^(-2i/n_rot), with llama3's band scaling applied when asked."""
    inv = cfg.base ** (-np.arange(0, cfg.n_rot, 2, dtype=np.float64) / cfg.n_rot)
    if cfg.scaling == "llama3" and cfg.factor != 1.0:
        low_wavelen = cfg.n_ctx_orig / cfg.llama3_low_freq_factor
        high_wavelen = cfg.n_ctx_orig / cfg.llama3_high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (cfg.n_ctx_orig / wavelen - cfg.llama3_low_freq_factor) / (
            cfg.llama3_high_freq_factor - cfg.llama3_low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv / cfg.factor, inv)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv = np.where(mid, (1 - smooth) * inv / cfg.factor + smooth * inv, scaled)
    if cfg.freq_factors is not None:
        inv = inv / np.asarray(cfg.freq_factors, dtype=np.float64)
    return inv


def _yarn_corr_dim(n_rot: int, n_ctx_orig: int, n_rotations: float, base: float) -> float:
    return n_rot * math.log(n_ctx_orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_tables(positions: np.ndarray, cfg: RopeConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_positions, n_rot/2] float32 for the given positions."""
    inv = inverse_frequencies(cfg)
    theta = positions.astype(np.float64)[:, None] * inv[None, :]
    mscale = 1.0
    if cfg.scaling == "linear":
        theta = theta / cfg.factor
    elif cfg.scaling == "yarn" and cfg.factor != 1.0:
        freq_scale = 1.0 / cfg.factor
        low = max(0.0, math.floor(_yarn_corr_dim(cfg.n_rot, cfg.n_ctx_orig, cfg.yarn_beta_fast, cfg.base)))
        high = min(cfg.n_rot - 1.0, math.ceil(_yarn_corr_dim(cfg.n_rot, cfg.n_ctx_orig, cfg.yarn_beta_slow, cfg.base)))
        i0 = np.arange(0, cfg.n_rot, 2, dtype=np.float64)
        ramp = 1.0 - np.clip((i0 / 2 - low) / max(0.001, high - low), 0.0, 1.0)
        mix = ramp * cfg.yarn_ext_factor
        theta = theta * freq_scale * (1 - mix) + theta * mix
        mscale = cfg.yarn_attn_factor * (1.0 + 0.1 * math.log(cfg.factor)) if cfg.yarn_ext_factor else cfg.yarn_attn_factor
    return (np.cos(theta) * mscale).astype(np.float32), (np.sin(theta) * mscale).astype(np.float32)


@kernel(inline=True)
def rotate_head(x, cos, sin, neox):
    """Rotate one head's vector x [head_dim] in place by one position's tables [n_rot/2]."""
    half = cos.shape[0]
    for i in range(half):
        a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
        x0, x1 = x[a], x[b]
        c, s = cos[i], sin[i]
        x[a] = x0 * c - x1 * s
        x[b] = x0 * s + x1 * c

