"""The feed-forward blocks a layer is composed of: one dense gated FFN, or a mixture of experts.

Both map the normed residual h [n_tokens, n_embd] to the block's output [n_tokens, n_embd].

A mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) routes each token to `n_used` of its `n_expert` gated
FFNs and sums their outputs weighted by the router; Qwen2-MoE adds a shared expert, always run, scaled by a
sigmoid gate of its own; DeepSeek-V2 adds ungated shared experts and scales the routed weights. GGUF stacks
the experts of a layer as one 3-D tensor per matrix,
`ffn_{gate,up,down}_exps` [n_expert, rows, n_embd]; each expert is repacked as its own lanes matrices, so a
token reads only its experts' rows, and a batch runs one product per expert over the tokens routed to it.
Each token's outputs are summed in expert order, its routing depends on its own scores alone, and every
product is batch invariant: a token's output does not depend on the batch it is in.
"""

from __future__ import annotations

import numpy as np

from ..ops.activations import geglu_tanh, swiglu
from ..ops.matmul import matmul
from ..ops.repack import LaneMatrix, lanes_nbytes, stack_lanes, stack_runs
from ..ops.routing import NO_BIAS, route_top_k, sigmoid

ACTIVATIONS = {"silu": swiglu, "gelu": geglu_tanh}


def project(h: np.ndarray, weights: list[LaneMatrix]) -> np.ndarray:
    """h @ W^T for W the matrices stacked by rows (one fused matrix, or neighbours of different layouts)."""
    if len(weights) == 1:  # fused (the usual case): no output slices
        return matmul(h, weights[0])
    out = np.empty((h.shape[0], sum(w.n_rows for w in weights)), np.float32)
    at = 0
    for w in weights:
        matmul(h, w, out=out[:, at : at + w.n_rows])
        at += w.n_rows
    return out


class DenseFFN:
    """act(h @ Wgate^T) * (h @ Wup^T) @ Wdown^T."""

    def __init__(self, gate_up: list[LaneMatrix], down: LaneMatrix, activation: str):
        self.gate_up = gate_up  # [2 * n_ff, n_embd]: gate rows, then up rows (one fused matrix, or two)
        self.down = down  # [n_embd, n_ff]
        self.activate = ACTIVATIONS[activation]

    @property
    def matrices(self) -> list[LaneMatrix]:
        return [*self.gate_up, self.down]

    def __call__(self, h: np.ndarray) -> np.ndarray:
        gate_up = project(h, self.gate_up)
        act = np.empty((h.shape[0], self.down.n_cols), np.float32)
        self.activate(act, gate_up)
        return matmul(act, self.down)


class ExpertFFN:
    """A mixture of gated experts, optionally with a shared expert (see the module's docstring)."""

    def __init__(self, router: list[LaneMatrix], experts: list[DenseFFN], n_used: int, normalize: bool,
                 shared: DenseFFN | None = None, scale: float = 1.0, sigmoid_gate: bool = False,
                 bias: np.ndarray = NO_BIAS, groups: tuple[int, int] = (1, 1)):
        self.router = router  # [n_expert (+ 1: the shared expert's gate, if it has one), n_embd]
        self.experts = experts
        self.n_used = n_used
        self.normalize = normalize  # the chosen experts' weights rescaled to sum to one
        self.shared = shared
        self.scale = np.float32(scale)  # every routed weight times this (DeepSeek's routed_scaling_factor)
        self.sigmoid_gate = sigmoid_gate  # each expert's score through a sigmoid, not a softmax over all (V3)
        self.bias = bias  # [n_expert] added to the scores to choose the experts, not to weigh them (exp_probs_b)
        self.groups = groups  # (groups of experts, groups kept per token): group-limited selection (V3)

    @property
    def matrices(self) -> list[LaneMatrix]:
        shared = self.shared.matrices if self.shared else []
        return [*self.router, *(m for e in self.experts for m in e.matrices), *shared]

    def __call__(self, h: np.ndarray) -> np.ndarray:
        n_expert = len(self.experts)
        scores = project(h, self.router)  # [n_tokens, n_expert (+ 1)]
        ids, weights = route_top_k(scores[:, :n_expert], self.n_used, self.normalize, self.sigmoid_gate, self.bias,
                                   *self.groups)  # [n_tokens, n_used]
        if self.scale != 1:
            weights *= self.scale
        out = np.zeros(h.shape, np.float32)  # [n_tokens, n_embd]
        for e in np.unique(ids):  # ascending: each token sums its experts in the same order in any batch
            tokens, slots = np.nonzero(ids == e)
            y = self.experts[e](np.ascontiguousarray(h[tokens]))
            out[tokens] += weights[tokens, slots, None] * y
        if self.shared is not None and scores.shape[1] > n_expert:  # gated by the router's extra row
            out += sigmoid(scores[:, n_expert:]) * self.shared(h)
        elif self.shared is not None:
            out += self.shared(h)
        return out


# ------------------------------------------------------------------------------------------ loading

def stacked_lanes_nbytes(t) -> int:
    """Bytes the lanes of a stacked tensor (GGUF shape [cols, rows, n_stacked]: experts, or latent attention's
    heads) take, each of its matrices repacked on its own."""
    n_cols, n_rows, n_stacked = t.shape
    return n_stacked * lanes_nbytes(t.type, n_rows, n_cols)


def load_experts(model, prefix: str, n_expert: int, n_embd: int, n_ff: int, activation: str) -> list[DenseFFN]:
    """The experts of `prefix` (blk.N.) from ffn_{gate,up,down}_exps, each repacked on its own.

    `model` is the loading Transformer: its tensor() checks each whole 3-D shape against the metadata."""
    gate = model.tensor(prefix + "ffn_gate_exps.weight", (n_embd, n_ff, n_expert))
    up = model.tensor(prefix + "ffn_up_exps.weight", (n_embd, n_ff, n_expert))
    down = model.tensor(prefix + "ffn_down_exps.weight", (n_ff, n_embd, n_expert))
    experts = []
    for e in range(n_expert):
        runs = stack_runs([(gate.data[e], gate.type), (up.data[e], up.type)])
        gate_up = [stack_lanes(run, n_embd, model.allocate) for run in runs]
        experts.append(DenseFFN(gate_up, stack_lanes([(down.data[e], down.type)], n_ff, model.allocate), activation))
    for t in (gate, up, down):
        model.gguf.release_pages(t)
    return experts

