"""FLOP counting for `summary`: torch's FlopCounterMode, with the gaps it has on vision models closed.

What is counted: matrix multiplies (mm, addmm, bmm, baddbmm, so every nn.Linear and einsum/matmul), convolutions
(incl. transposed) and attention (q @ k^T and weights @ v of every scaled-dot-product-attention kernel), at
1 multiply-add = 2 FLOPs. Not counted: element-wise ops, normalisation, softmax, pooling and bias adds (a few
percent on CNNs and ViTs).

Gaps closed here (checked on torch 2.14):
- nn.MultiheadAttention and nn.TransformerEncoder(Layer) take a fused fast path (`torch._native_multi_head_attention`)
  under no_grad in eval mode; FlopCounterMode has no formula for it, so the q/k/v and output projections went
  uncounted (torchvision vit_b_32: 5.90 G instead of 8.82 G). The fast path is switched off while counting
  (`torch.backends.mha.set_fastpath_enabled`), so the modules run their plain, counted ops; outputs are the same.
- the CPU, MPS and out-of-tree SDPA kernels (`_scaled_dot_product_flash_attention_for_cpu`, ...) have no formula
  (only the CUDA ones do), so F.scaled_dot_product_attention counted 0 on the CPU (timm ViTs, and torchvision's
  MHA with need_weights=False): formulas for them are added.
Any other attention-like or matmul-like op that runs without a formula is recorded by name (`uncounted`), so the
report can say that the count is low instead of showing a wrong number as if it were right.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

COUNTED = ("matrix multiplies (every linear layer, matmul, einsum), convolutions and attention (q·kᵀ and "
           "weights·v); 1 multiply-add = 2 FLOPs; element-wise ops, normalisation, softmax, pooling and bias adds "
           "are not counted")

aten = torch.ops.aten


def sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, out_shape: Any = None,
               **kwargs: Any) -> int:
    """FLOPs of softmax(q k^T) v for q (..., L, E), k (..., S, E), v (..., S, Ev): 2 L S E + 2 L S Ev per leading
    index of q (heads included; grouped-query k/v with fewer heads are broadcast to q's)."""
    batch = math.prod(query_shape[:-2])
    length, dim = query_shape[-2], query_shape[-1]
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * length * keys * dim + 2 * batch * length * keys * value_dim


# the SDPA kernels FlopCounterMode has no formula for; each takes (query, key, value, ...) first
SDPA_KERNELS = {aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flops,
                aten._scaled_dot_product_fused_attention_overrideable: sdpa_flops,
                aten._scaled_dot_product_attention_math_for_mps: sdpa_flops}

# op names that do multiply-adds worth counting: seen without a formula, the count is low
_HEAVY = re.compile(r"attention|multi_head|transformer|conv|mm|matmul|(?<!bi)(?<!tri)linear|einsum|lstm|gru|rnn")  # not upsample_(bi|tri)linear


class _Uncounted(TorchDispatchMode):
    """Below a FlopCounterMode, sees every op it ran (after its own decompositions) and keeps the names and call
    counts of the heavy ones it has no formula for."""

    def __init__(self, registry: Any):
        super().__init__()
        self.registry = registry
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        packet = getattr(func, "_overloadpacket", None)
        if packet is not None and packet not in self.registry and _HEAVY.search(str(packet)):
            self.ops[str(packet)] += 1
        return func(*args, **(kwargs or {}))


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the SDPA kernels listed in SDPA_KERNELS."""
    return FlopCounterMode(display=False, custom_mapping=SDPA_KERNELS)


@contextmanager
def counting(counter: FlopCounterMode) -> Iterator[Counter]:
    """Count the block's FLOPs in `counter` with nn.MultiheadAttention's fast path off; yields a Counter that ends
    up holding {op name: calls} of the heavy ops that ran without a formula (empty when the count is complete)."""
    uncounted = _Uncounted(counter.flop_registry)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with uncounted, counter:
            yield uncounted.ops
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
