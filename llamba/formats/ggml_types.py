"""The one table of GGML tensor types: id, name, elements per block, bytes per block.

Everything that needs a block size (the reader, the block formats, the kernels' dispatch) looks it up here.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UnsupportedError

QK_K = 256  # elements in a K-quant super-block


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block_elements: int
    block_bytes: int

    def row_bytes(self, n_elements: int) -> int:
        """Bytes taken by a row of n_elements (which must be a whole number of blocks)."""
        return n_elements // self.block_elements * self.block_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_elements


_TABLE = [
    GGMLType(0, "F32", 1, 4),
    GGMLType(1, "F16", 1, 2),
    GGMLType(2, "Q4_0", 32, 18),
    GGMLType(3, "Q4_1", 32, 20),
    GGMLType(6, "Q5_0", 32, 22),
    GGMLType(7, "Q5_1", 32, 24),
    GGMLType(8, "Q8_0", 32, 34),
    GGMLType(9, "Q8_1", 32, 40),
    GGMLType(10, "Q2_K", QK_K, 84),
    GGMLType(11, "Q3_K", QK_K, 110),
    GGMLType(12, "Q4_K", QK_K, 144),
    GGMLType(13, "Q5_K", QK_K, 176),
    GGMLType(14, "Q6_K", QK_K, 210),
    GGMLType(15, "Q8_K", QK_K, 292),
    GGMLType(16, "IQ2_XXS", QK_K, 66),
    GGMLType(17, "IQ2_XS", QK_K, 74),
    GGMLType(18, "IQ3_XXS", QK_K, 98),
    GGMLType(19, "IQ1_S", QK_K, 50),
    GGMLType(20, "IQ4_NL", 32, 18),
    GGMLType(21, "IQ3_S", QK_K, 110),
    GGMLType(22, "IQ2_S", QK_K, 82),
    GGMLType(23, "IQ4_XS", QK_K, 136),
    GGMLType(24, "I8", 1, 1),
    GGMLType(25, "I16", 1, 2),
    GGMLType(26, "I32", 1, 4),
    GGMLType(27, "I64", 1, 8),
    GGMLType(28, "F64", 1, 8),
    GGMLType(29, "IQ1_M", QK_K, 56),
    GGMLType(30, "BF16", 1, 2),
    GGMLType(34, "TQ1_0", QK_K, 54),
    GGMLType(35, "TQ2_0", QK_K, 66),
    GGMLType(39, "MXFP4", 32, 17),
]

BY_ID: dict[int, GGMLType] = {t.id: t for t in _TABLE}
BY_NAME: dict[str, GGMLType] = {t.name: t for t in _TABLE}

# Plain element types: a tensor of these is viewed with its NumPy dtype, not as raw block bytes.
NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}

# llama.cpp's general.file_type values (LLAMA_FTYPE_*), for display.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M",
    18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S",
    25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M",
    32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}


def ggml_type(key: int | str) -> GGMLType:
    """Look a type up by id or by name; an unknown one is an UnsupportedError."""
    table = BY_ID if isinstance(key, int) else BY_NAME
    try:
        return table[key if isinstance(key, int) else key.upper()]
    except KeyError:
        raise UnsupportedError(f"unknown GGML type {key!r}") from None
