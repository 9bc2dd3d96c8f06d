"""Kernels usable without the model, each beside its reference.

One import line per kernel package, so each package adds its own line without touching the others.
"""

from pallas_kernels.gated_delta_rule import chunk_gated_delta_rule as chunk_gated_delta_rule
from pallas_kernels.gated_delta_rule import gated_delta_rule_step as gated_delta_rule_step
from pallas_kernels.gated_delta_rule import recurrent_gated_delta_rule as recurrent_gated_delta_rule
from pallas_kernels.gated_linear_attention import chunk_gated_linear_attention as chunk_gated_linear_attention
from pallas_kernels.flash_attention import flash_attention as flash_attention
from pallas_kernels.gmm import gmm as gmm
from pallas_kernels.gmm import tgmm as tgmm
from pallas_kernels.target import compile_for as compile_for
