"""The KV cache: cells holding keys and values, each cell recording its position and its sequences.

Cells are handed out lowest-free-first. A cell belongs to one or more sequences (a bit mask, so a shared
prompt prefix can serve several), and what a new token attends to follows from those records (see
`memory/batch.py`): its sequence's cached cells in position order, then its ancestors in the batch. Because
attention always walks the visible cells in position order, where a cell sits never changes a result: a token
attends identically alone, among guesses, or beside other sequences.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import BadRequestError, ContextOverflowError, LlambaError, UnsupportedError
from ..ops.attention import attention_chain, attention_listed
from ..ops.jit import kernel
from ..ops.kv_blocks import BLOCK, ROW_DTYPE, decode_cells, row_bytes, store_cells
from .batch import Batch

KV_TYPES = ("f32", "f16", "q8_0", "q4_0")
QUANTIZED = tuple(ROW_DTYPE)
SPARE_CELLS = 64  # beyond n_ctx: a tree of guesses can hold several tokens at one position


@kernel
def _write_cells(dst, cells, src):
    """dst[h, cells[t]] = src[t, h] (a loop: NumPy's fancy-index assignment costs several microseconds a
    call, and decoding makes two per layer per token)."""
    for t in range(src.shape[0]):
        for h in range(src.shape[1]):
            dst[h, cells[t]] = src[t, h]


def check_kv_type(kv_type: str) -> None:
    if kv_type not in KV_TYPES:
        raise BadRequestError(f"unknown KV cache type {kv_type!r} (choose from {', '.join(KV_TYPES)})")


class LayerKV:
    """One layer's keys and values as attention sees them: the model writes its new tokens' k and v, then attends
    over the cells a placement made visible, and never sees how they are stored. A new kind of cache (quantized
    blocks, MLA's latent vectors) is another class with these three methods, not an edit of the model.

    Here: k, v [n_head_kv, n_cells, head_dim], float32, or float16 bits as uint16 (the kernels decode them).
    """

    def __init__(self, k: np.ndarray, v: np.ndarray, cell_pos: np.ndarray):
        self.k, self.v, self.cell_pos = k, v, cell_pos
        # keys stored as they are: attention's centre 0 and spread 1 per channel (see BlockLayerKV)
        self.centre = np.zeros((k.shape[0], k.shape[2]), np.float32)
        self.spread = np.ones_like(self.centre)

    def write(self, cells: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """Store k, v [n_tokens, n_head_kv, head_dim] float32 in the given cells (v only if it is kept apart:
        a latent cache's values are its keys, one array)."""
        _write_cells(self.k, cells, self._stored(k))
        if self.v is not self.k:
            _write_cells(self.v, cells, self._stored(v))

    def _stored(self, x: np.ndarray) -> np.ndarray:
        return x if self.k.dtype == np.float32 else x.astype(np.float16).view(np.uint16)

    def attend_chain(self, out, q, keys, key_pos, q_pos, scale, window, softcap) -> None:
        """out = attention of q [n_tokens, n_head, head_dim] over the cells `keys` (a chain: a prompt, each query
        seeing the keys up to its own position)."""
        attention_chain(out, q, _floats(self.k[:, keys]), _floats(self.v[:, keys]), key_pos, q_pos, scale, window,
                        softcap)

    def attend_listed(self, out, q, visible, counts, q_pos, scale, window, softcap) -> None:
        """out = attention of q where query t sees the cells visible[t, :counts[t]], in position order."""
        attention_listed(out, q, self.k, self.v, self.centre, self.spread, visible, counts, self.cell_pos, q_pos,
                         scale, window, softcap)


class BlockLayerKV(LayerKV):
    """A layer's keys and values as q8_0 or q4_0 blocks of 32 along the head dimension (ggml's formats, see
    ops/kv_blocks.py), each cell's bytes [n_head_kv, n_cells, row bytes] from its own token alone.

    Keys are centred and spread per channel before quantizing: stored as (k - centre) / spread, with a fixed
    centre and spread per (head, channel) from the model (KeyStatistics). Some models' keys carry channels
    that are nearly constant and a hundred times larger than the rest (Qwen2's key biases, on the slowly
    rotating RoPE channels): per-block quantization along the head then spends every level on them and rounds
    the informative channels to nothing, as llama.cpp's quantized caches do. Attention adds q . centre back and
    multiplies q by the spread, so the scores are the same scores. Values are quantized as they are."""

    def __init__(self, k, v, cell_pos, centre: np.ndarray, spread: np.ndarray):
        super().__init__(k, v, cell_pos)
        self.centre, self.spread = centre, spread  # [n_head_kv, head_dim] float32
        self.inverse_spread = (np.float32(1.0) / spread).astype(np.float32)
        self.zero = np.zeros_like(centre)
        self.one = np.ones_like(centre)

    def write(self, cells, k, v) -> None:
        store_cells(self.k, cells, k, self.centre, self.inverse_spread)
        store_cells(self.v, cells, v, self.zero, self.one)

    def attend_chain(self, out, q, keys, key_pos, q_pos, scale, window, softcap) -> None:
        """Prefill: the keys and values the chain sees, decoded once for all its queries."""
        shape = (self.k.shape[0], len(keys), self.centre.shape[1])
        keys_f, values_f = np.empty(shape, np.float32), np.empty(shape, np.float32)
        decode_cells(keys_f, self.k, keys, self.centre, self.spread)
        decode_cells(values_f, self.v, keys, self.zero, self.one)
        attention_chain(out, q, keys_f, values_f, key_pos, q_pos, scale, window, softcap)


class SharedBlockLayerKV(BlockLayerKV):
    """A latent cache's blocks (values_are_keys): one q8_0 / q4_0 array holds each vector once, centred and
    spread as keys are. Attention's weighted sum of the stored values is then sum_j p_j (v_j - centre) /
    spread, and since the weights sum to one, times the spread plus the centre gives back sum_j p_j v_j."""

    def write(self, cells, k, v) -> None:
        store_cells(self.k, cells, k, self.centre, self.inverse_spread)

    def attend_chain(self, out, q, keys, key_pos, q_pos, scale, window, softcap) -> None:
        """Prefill: the vectors the chain sees, decoded once as keys and values both."""
        vectors = np.empty((self.k.shape[0], len(keys), self.centre.shape[1]), np.float32)
        decode_cells(vectors, self.k, keys, self.centre, self.spread)
        attention_chain(out, q, vectors, vectors, key_pos, q_pos, scale, window, softcap)

    def attend_listed(self, out, q, visible, counts, q_pos, scale, window, softcap) -> None:
        attention_listed(out, q, self.k, self.k, self.centre, self.spread, visible, counts, self.cell_pos, q_pos,
                         scale, window, softcap)  # the values come out as stored: centred and spread
        group = q.shape[1] // self.centre.shape[0]  # query heads per kv head
        out *= np.repeat(self.spread, group, axis=0)
        out += np.repeat(self.centre, group, axis=0)


@dataclass
class KeyStatistics:
    """Per layer, the centre and spread [n_head_kv, head_dim] a quantized cache takes out of the keys before
    quantizing them (see BlockLayerKV). Any values give the right attention; good ones give accurate codes."""

    centre: list[np.ndarray]
    spread: list[np.ndarray]

    @classmethod
    def of_keys(cls, keys: list[np.ndarray], neox: bool) -> "KeyStatistics":
        """From sample keys per layer [n_head_kv, n_tokens, head_dim] (RoPE applied): the mean per channel, and
        the root-mean-square about it of each rotated pair (RoPE turns a pair's two channels into each other, so
        they share one spread)."""
        centres, spreads = [], []
        for k in keys:
            k = k.astype(np.float64)
            centre = k.mean(axis=1)
            power = ((k - centre[:, None]) ** 2).mean(axis=1)
            half = power.shape[1] // 2
            first, second = (np.arange(half), np.arange(half, 2 * half)) if neox else \
                (np.arange(0, 2 * half, 2), np.arange(1, 2 * half, 2))
            pair = (power[:, first] + power[:, second]) / 2
            power[:, first] = power[:, second] = pair
            spread = np.sqrt(power)
            floor = 1e-3 * max(float(spread.max()), 1e-30)  # a channel that never moves: no division by ~0
            centres.append(centre.astype(np.float32))
            spreads.append(np.maximum(spread, floor).astype(np.float32))
        return cls(centres, spreads)


class KVCache:
    """Keys and values [n_layer][n_head_kv, n_cells, head_dim] with per-cell position and sequence mask.

    kv_type "f32" stores float32; "f16" stores float16 bits as uint16 (half the memory; Numba has no float16
    type, and the attention kernels decode the bits exactly); "q8_0" and "q4_0" store ggml blocks (BlockLayerKV),
    their keys about key_stats (a model's KeyStatistics; without them, plain blocks as llama.cpp's). np.zeros maps untouched pages lazily, so a long
    context costs memory only as it fills. Positions of a sequence run from 0 to n_ctx - 1.

    values_are_keys (latent attention, whose cached vector [k_pe | c] is its key and its value): one array per
    layer serves as both, kv_lora_rank + n_rot values a token and layer (quantized: SharedBlockLayerKV).
    """

    def __init__(self, n_layer: int, n_head_kv: int, head_dim: int, n_ctx: int, kv_type: str = "f32",
                 n_cells: int | None = None, key_stats: KeyStatistics | None = None, values_are_keys: bool = False):
        check_kv_type(kv_type)
        if kv_type in QUANTIZED and head_dim % BLOCK:
            raise UnsupportedError(f"a {kv_type} KV cache needs heads of a multiple of {BLOCK} values (this model's "
                                   f"have {head_dim}): use --kv-type f16")
        self.n_ctx = n_ctx
        self.kv_type = kv_type
        self.n_cells = n_cells or n_ctx + SPARE_CELLS
        dtype = {"f32": np.float32, "f16": np.uint16}.get(kv_type) or ROW_DTYPE[kv_type]
        width = row_bytes(kv_type, head_dim) if kv_type in QUANTIZED else head_dim
        copies = 1 if values_are_keys else 2
        _check_fits(copies * n_layer * n_head_kv * self.n_cells * width * np.dtype(dtype).itemsize, n_ctx, kv_type)
        self.k = [np.zeros((n_head_kv, self.n_cells, width), dtype) for _ in range(n_layer)]
        self.v = self.k if values_are_keys else [np.zeros((n_head_kv, self.n_cells, width), dtype)
                                                 for _ in range(n_layer)]
        self.cell_pos = np.full(self.n_cells, -1, np.int64)
        self.cell_seqs = np.zeros(self.n_cells, np.uint64)  # bit s: the cell belongs to sequence s; 0: free
        self.last_cells = np.zeros(0, np.int64)  # the cells the latest batch was given, in batch order
        if kv_type in QUANTIZED:
            flat = np.zeros((n_head_kv, head_dim), np.float32)
            self.key_stats = key_stats or KeyStatistics([flat] * n_layer, [flat + 1] * n_layer)
            blocks = SharedBlockLayerKV if values_are_keys else BlockLayerKV
            self._layers = [blocks(k, v, self.cell_pos, c, s)
                            for k, v, c, s in zip(self.k, self.v, self.key_stats.centre, self.key_stats.spread)]
        else:
            self.key_stats = None
            self._layers = [LayerKV(k, v, self.cell_pos) for k, v in zip(self.k, self.v)]

    def layer(self, i: int) -> LayerKV:
        """Layer i's keys and values, the only way attention reaches them."""
        return self._layers[i]

    @classmethod
    def for_model(cls, hp, n_ctx: int | None = None, kv_type: str = "f32", n_cells: int | None = None,
                  key_stats: KeyStatistics | None = None) -> "KVCache":
        return cls(hp.n_layer, hp.n_head_kv, hp.head_dim, n_ctx or hp.n_ctx_train, kv_type, n_cells, key_stats,
                   values_are_keys=hp.mla is not None)

    # ------------------------------------------------------------------------------------- sequences

    def seq_cells(self, seq: int = 0) -> np.ndarray:
        """The cells of a sequence in position order."""
        cells = np.flatnonzero(self.cell_seqs & _bit(seq))
        return cells[np.argsort(self.cell_pos[cells], kind="stable")]

    def seq_length(self, seq: int = 0) -> int:
        """One past the last cached position of a sequence (0 when it holds nothing)."""
        cells = np.flatnonzero(self.cell_seqs & _bit(seq))
        return int(self.cell_pos[cells].max()) + 1 if len(cells) else 0

    def remove(self, seq: int, p0: int = 0, p1: int | None = None) -> None:
        """Forget a sequence's positions p0 .. p1-1 (to the end when p1 is None); cells nobody holds are freed."""
        hit = self._cells_of(seq, p0, p1)
        self.cell_seqs[hit] &= ~_bit(seq)
        self._free_orphans()

    def remove_cells(self, cells: np.ndarray) -> None:
        """Free these cells whatever they hold (guesses that were rejected)."""
        self.cell_seqs[cells] = 0
        self.cell_pos[cells] = -1

    def copy_seq(self, src: int, dst: int, p0: int = 0, p1: int | None = None) -> None:
        """Let sequence dst share src's cells at positions p0 .. p1-1 (a common prefix, computed once)."""
        self.cell_seqs[self._cells_of(src, p0, p1)] |= _bit(dst)

    def _cells_of(self, seq: int, p0: int, p1: int | None) -> np.ndarray:
        """Mask of the cells holding a sequence's positions p0 .. p1-1 (to the end when p1 is None)."""
        hit = ((self.cell_seqs & _bit(seq)) != 0) & (self.cell_pos >= p0)
        if p1 is not None:
            hit &= self.cell_pos < p1
        return hit

    def read_seq(self, seq: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """A sequence's keys and values per layer, [n_head_kv, n_positions, head_dim] in position order
        (a saved chat); the sequence must hold positions 0 .. n-1."""
        cells = self.seq_cells(seq)
        return [k[:, cells] for k in self.k], [v[:, cells] for v in self.v]

    def write_seq(self, seq: int, keys: list[np.ndarray], values: list[np.ndarray]) -> None:
        """Replace a sequence with saved keys and values (as read_seq gives them) at positions 0 .. n-1."""
        self.remove(seq)
        n = keys[0].shape[1]
        cells = np.flatnonzero(self.cell_seqs == 0)[:n]
        if len(cells) < n or n > self.n_ctx:
            raise ContextOverflowError(f"{n} saved positions do not fit this context of {self.n_ctx}")
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.k[layer][:, cells] = k
            self.v[layer][:, cells] = v
        self.cell_pos[cells] = np.arange(n)
        self.cell_seqs[cells] = _bit(seq)

    def clear(self) -> None:
        self.cell_seqs[:] = 0
        self.cell_pos[:] = -1

    def _free_orphans(self) -> None:
        self.cell_pos[self.cell_seqs == 0] = -1

    # A single conversation is sequence 0: these keep its simple view.
    @property
    def n_past(self) -> int:
        return self.seq_length(0)

    def trim(self, n: int) -> None:
        """Forget sequence 0 from position n on (a chat turn regenerated, guesses rejected)."""
        self.remove(0, max(0, n))

    # ------------------------------------------------------------------------------------- a forward pass

    def place(self, batch: Batch) -> "Placement":
        """Give each batch token a free cell (lowest first), recording its position and sequence."""
        cached = {int(s): self.seq_cells(int(s)) for s in np.unique(batch.seq_ids)}
        for s, cells in cached.items():
            first = batch.positions[batch.seq_ids == s].min()
            if len(cells) and self.cell_pos[cells[-1]] >= first:
                raise LlambaError(f"position {first} of sequence {s} is already in the cache (remove it first)")
        if batch.positions.max() >= self.n_ctx:
            raise ContextOverflowError(f"context is full: position {batch.positions.max()} is past the context of {self.n_ctx}")
        free = np.flatnonzero(self.cell_seqs == 0)[: len(batch)]
        if len(free) < len(batch):
            raise ContextOverflowError(f"the KV cache has no room for {len(batch)} more tokens ({self.n_cells} cells)")
        self.cell_pos[free] = batch.positions
        self.cell_seqs[free] = np.left_shift(np.uint64(1), batch.seq_ids.astype(np.uint64))
        self.last_cells = free.astype(np.int64)  # so a caller can free single rows (rejected guesses) after
        return Placement(batch, self.last_cells, cached, self.cell_pos)

    # ------------------------------------------------------------------------------------- sizes

    @property
    def _arrays(self) -> list[np.ndarray]:
        """Every array the cache holds, once (a latent cache's values are its keys)."""
        return self.k if self.v is self.k else self.k + self.v

    @property
    def nbytes(self) -> int:
        """The whole cache, every cell (pages of unused cells are never touched)."""
        return sum(a.nbytes for a in self._arrays)

    @property
    def nbytes_used(self) -> int:
        return self.bytes_per_cell * int((self.cell_seqs != 0).sum())

    @property
    def bytes_per_cell(self) -> int:
        """Keys and values of one token, every layer (a latent cache's one array counted once)."""
        return sum(a.shape[0] * a.shape[2] * a.itemsize for a in self._arrays)

    @property
    def free_cells(self) -> int:
        return int((self.cell_seqs == 0).sum())

    def commit(self) -> None:
        """Touch every page now: np.zeros maps them lazily, so a cache that is to be the process's from the
        start (a server's budget) is written once here rather than found missing when it fills."""
        for a in self._arrays:
            a.fill(0)


@dataclass
class Placement:
    """Where a batch went in the cache, and what each of its tokens sees."""

    batch: Batch
    cells: np.ndarray  # [n] the cell of each batch token
    cached: dict[int, np.ndarray]  # sequence -> its cells from before this batch, in position order
    cell_pos: np.ndarray  # [n_cells] the cache's position of each cell

    def visible_lists(self) -> tuple[np.ndarray, np.ndarray]:
        """(visible, counts): visible[t, :counts[t]] are the cells token t attends to, in position order (its
        sequence's cells cached before this batch, then its ancestors in the batch and itself)."""
        b = self.batch
        order = {s: i for i, s in enumerate(self.cached)}
        flat = np.concatenate(list(self.cached.values())).astype(np.int64)
        lengths = np.array([len(c) for c in self.cached.values()], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        seq_index = np.array([order[int(s)] for s in b.seq_ids], np.int64)
        depth = _depths(b.parents)
        visible = np.empty((len(b), int((lengths[seq_index] + depth).max())), np.int64)
        counts = np.empty(len(b), np.int64)
        _fill_visible(visible, counts, flat, starts, lengths, seq_index, b.parents, self.cells)
        return visible, counts

    @property
    def is_chain(self) -> bool:
        """One sequence, each token continuing the one before (a prompt)."""
        b = self.batch
        return len(self.cached) == 1 and bool((b.parents == np.arange(-1, len(b) - 1)).all())

    def chain_keys(self) -> tuple[np.ndarray, np.ndarray]:
        """For a chain: every cell its last token sees, in position order, and their positions."""
        keys = np.concatenate([next(iter(self.cached.values())), self.cells])
        return keys, self.cell_pos[keys]


def _bit(seq: int) -> np.uint64:
    return np.uint64(1) << np.uint64(seq)


def _depths(parents: np.ndarray) -> np.ndarray:
    """How many batch tokens each token sees in the batch (its ancestors and itself)."""
    depth = np.ones(len(parents), np.int64)
    for t, p in enumerate(parents):  # parents come first, so one pass suffices
        if p >= 0:
            depth[t] = depth[p] + 1
    return depth


@kernel
def _fill_visible(visible, counts, flat, starts, lengths, seq_index, parents, cells):
    for t in range(visible.shape[0]):
        s = seq_index[t]
        m = lengths[s]
        for j in range(m):
            visible[t, j] = flat[starts[s] + j]
        depth = 0
        a = t
        while a >= 0:
            depth += 1
            a = parents[a]
        a = t
        for d in range(depth - 1, -1, -1):
            visible[t, m + d] = cells[a]
            a = parents[a]
        counts[t] = m + depth


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), None where it does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fits(n_bytes: int, n_ctx: int, kv_type: str) -> None:
    """Refuse a cache larger than the machine's memory (it is mapped lazily, so it would fail only when full)."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: let the allocation decide
        return
    if n_bytes > memory:
        smaller = KV_TYPES[KV_TYPES.index(kv_type) + 1 :]  # each type takes less memory than the one before
        raise LlambaError(f"a context of {n_ctx} tokens needs {n_bytes / 2**30:.1f} GiB of {kv_type} KV cache; this "
                          f"machine has {memory / 2**30:.1f} GiB (use a smaller -c"
                          + (f", or --kv-type {smaller[0]}" if smaller else "") + ")")


def _floats(cached: np.ndarray) -> np.ndarray:
    """Cache rows as float32 (a float16 cache holds its values as uint16 bits)."""
    return cached.view(np.float16).astype(np.float32) if cached.dtype == np.uint16 else cached
