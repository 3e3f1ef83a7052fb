"""Rotary position embeddings: tables of cos/sin per position (NumPy), applied to a head in place (Numba,
inlined into heads.split_heads).

Two layouts: NORM rotates adjacent pairs (x[2i], x[2i+1]) - llama's converter permutes Q/K for it; NEOX
rotates the halves (x[i], x[i + n_rot/2]) - Qwen and Gemma. Frequency scalings follow llama.cpp: linear
(positions divided by the factor), YaRN (a ramp between interpolated and extrapolated frequencies plus an
attention-magnitude correction), and llama3's wavelength bands.

YaRN as ggml's rope_yarn computes it: pair i's angle blends the interpolated theta / factor and the original
theta by a ramp over the pairs between the correction dimensions of beta_fast and beta_slow, and cos and sin
are scaled by the magnitude llama.cpp ends up with: attn_factor * mscale(factor), mscale(s) = 1 + 0.1 ln s,
for Qwen2 and llama; attn_factor alone for DeepSeek-V2/V3, whose mscale_all_dim goes into the attention's
scale instead (`yarn_attention_scale`), squared, as their modeling code and llama.cpp do. llama.cpp reads
beta_fast / beta_slow / ext_factor from the file for other families only: these take its defaults.
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
    yarn_attn_factor: float = 1.0  # rope.scaling.attn_factor: a further factor on the magnitude
    # DeepSeek's mscale_all_dim (GGUF: rope.scaling.yarn_log_multiplier = 0.1 x it); 0: none. llama.cpp takes
    # its mscale to be the same, so the tables' magnitude is attn_factor and the attention scale carries it.
    yarn_mscale_all_dim: float = 0.0
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
    """The pair index at which a frequency turns n_rotations times over the training context."""
    return n_rot * math.log(n_ctx_orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched `factor` times."""
    return 1.0 + 0.1 * mscale * math.log(factor) if factor > 1.0 else 1.0


def yarn_attention_scale(cfg: RopeConfig) -> float:
    """The factor on DeepSeek's 1/sqrt(head size), as llama.cpp's deepseek2 graph pre-scales its kq_scale:
    (attn_factor * mscale(factor, mscale_all_dim))^2, attn_factor^2 without YaRN."""
    factor = cfg.factor if cfg.scaling == "yarn" else 1.0
    return (cfg.yarn_attn_factor * yarn_mscale(factor, cfg.yarn_mscale_all_dim)) ** 2


def _yarn_theta(theta: np.ndarray, cfg: RopeConfig) -> tuple[np.ndarray, float]:
    """ggml's rope_yarn on the angles [n_positions, n_rot/2]: (the blended angles, the tables' magnitude)."""
    low = max(0.0, math.floor(_yarn_corr_dim(cfg.n_rot, cfg.n_ctx_orig, cfg.yarn_beta_fast, cfg.base)))
    high = min(cfg.n_rot - 1.0, math.ceil(_yarn_corr_dim(cfg.n_rot, cfg.n_ctx_orig, cfg.yarn_beta_slow, cfg.base)))
    pair = np.arange(cfg.n_rot // 2, dtype=np.float64)
    extrapolated = (1.0 - np.clip((pair - low) / max(0.001, high - low), 0.0, 1.0)) * cfg.yarn_ext_factor
    theta = theta / cfg.factor * (1 - extrapolated) + theta * extrapolated
    if cfg.yarn_ext_factor and not cfg.yarn_mscale_all_dim:
        return theta, cfg.yarn_attn_factor * yarn_mscale(cfg.factor)
    return theta, cfg.yarn_attn_factor  # DeepSeek: mscale(factor, mscale) / mscale(factor, mscale_all_dim) = 1


def rope_tables(positions: np.ndarray, cfg: RopeConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_positions, n_rot/2] float32 for the given positions."""
    inv = inverse_frequencies(cfg)
    theta = positions.astype(np.float64)[:, None] * inv[None, :]
    magnitude = cfg.yarn_attn_factor  # ggml scales the tables by rope.scaling.attn_factor whatever the scaling
    if cfg.scaling == "linear":
        theta = theta / cfg.factor
    elif cfg.scaling == "yarn" and cfg.factor != 1.0:
        theta, magnitude = _yarn_theta(theta, cfg)
    return (np.cos(theta) * magnitude).astype(np.float32), (np.sin(theta) * magnitude).astype(np.float32)


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

