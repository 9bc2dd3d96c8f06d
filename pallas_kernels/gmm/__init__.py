"""Grouped matmul for dropless MoE: `gmm(lhs [M, K], rhs [G, K, N], group_sizes) -> [M, N]` and its weight
gradient `tgmm`. Reference, XLA (CPU/GPU) and Pallas TPU implementations; see README.md."""

from pallas_kernels.gmm.api import gmm, resolve_impl, tgmm
from pallas_kernels.gmm.fp8 import gmm_fp8
from pallas_kernels.gmm.reference import gmm_reference, tgmm_reference

__all__ = ["gmm", "gmm_fp8", "tgmm", "resolve_impl", "gmm_reference", "tgmm_reference"]
