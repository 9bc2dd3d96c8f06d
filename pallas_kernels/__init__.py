"""Kernels usable without the model, each beside its reference."""

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule, gated_delta_rule_step, recurrent_gated_delta_rule
from pallas_kernels.gmm import gmm, tgmm

__all__ = ["chunk_gated_delta_rule", "gated_delta_rule_step", "recurrent_gated_delta_rule", "gmm", "tgmm"]
