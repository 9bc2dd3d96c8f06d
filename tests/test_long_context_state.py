"""Generation at long context: the Gated DeltaNet decode state is constant in the context length, the KV cache of
the attention layers grows linearly, and the README's decode-state table (Qwen3.5-397B-A17B at 32k/256k/1M) is what
`cache_bytes` computes, checked against the closed form from the config (no arrays are allocated)."""

import re
from pathlib import Path

import pytest

from qwen35_jax import load_config
from qwen35_jax.model import cache_bytes

README = Path(__file__).resolve().parents[1] / "README.md"
CONTEXTS = {"32k": 32768, "256k": 262144, "1M": 1048576}


def closed_form(cfg, context):
    kinds = [m for m, _ in cfg.layer_kinds]
    n_attn, n_gdn = kinds.count("attn"), kinds.count("gdn")
    kv = n_attn * (2 * cfg.num_kv_heads * cfg.head_dim * 2 + 1) * context  # bf16 K and V, a bool valid flag per slot
    state = n_gdn * (cfg.gdn_num_value_heads * cfg.gdn_key_dim * cfg.gdn_value_dim * 4    # fp32 delta-rule state
                     + (cfg.gdn_conv_kernel - 1) * cfg.gdn_conv_dim * 2)                  # bf16 conv window
    return kv, state


def test_decode_state_is_constant_and_the_readme_table_holds():
    cfg = load_config("qwen3.5-397b-a17b")
    rows = {m.group(1): [float(x) for x in m.groups()[1:]]
            for m in re.finditer(r"^\| (32k|256k|1M) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                                 README.read_text(), re.M)}
    assert set(rows) == set(CONTEXTS), "README decode-state table not found"
    recurrent = set()
    for name, T in CONTEXTS.items():
        got = cache_bytes(cfg, 1, T, "bfloat16")
        kv, state = closed_form(cfg, T)
        assert (got["kv_cache"], got["recurrent"]) == (kv, state), name
        recurrent.add(got["recurrent"])
        gib = [x / 2 ** 30 for x in (kv, state, kv + state)]
        readme_kv, readme_state, readme_total, _ = rows[name]
        assert readme_kv == pytest.approx(gib[0], abs=0.006), name
        assert readme_state == pytest.approx(gib[1], abs=0.0006), name
        assert readme_total == pytest.approx(gib[2], abs=0.006), name
    assert len(recurrent) == 1  # the GDN state does not grow with the context
