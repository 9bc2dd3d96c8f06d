"""Rematerialisation keeps its promise where it matters, in the XLA:TPU program: with `remat: full` the train step
holds about one block's working set, not every block's. A layer group of several blocks runs as one scan iteration
(the tiny model's GGGA is a single iteration), where only `prevent_cse` keeps XLA from merging each block's
recomputation with its forward pass (without it, tiny-64k-v5e's one-64k-row step needed 3.11 GiB of temporaries
under full remat, with it 1.02; benchmarks/README.md)."""

import pytest

pytest.importorskip("libtpu", reason="libtpu (jax[tpu]) is needed to compile for TPU on a CPU host")


def _temps(remat: str, *extra) -> int:
    from qwen35_jax.train.aot import compile_train_step, topology_devices, tpu_env
    from qwen35_jax.train.config import load_train_config

    tpu_env()
    tcfg = load_train_config(None, ["batch_size=4", "seq_len=2048", "mesh.data=4", "model.num_layers=4",
                                    "model.mtp_num_layers=0", "model.vocab_size=256", f"model.remat={remat}", *extra])
    _, _, compiled, _, _, _ = compile_train_step(tcfg, topology_devices("v5e:2x2"))
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.fixture(scope="module")
def full_block():
    return _temps("full")


def test_full_remat_of_a_multi_block_group_frees_the_blocks_activations(full_block):
    none = _temps("none")
    assert full_block < 0.5 * none, (full_block, none)


def test_sublayer_remat_and_moe_token_slices_hold_less_than_a_block(full_block):
    """`remat_scope: sublayer` keeps the mixer's and the MoE's working sets apart, `moe_token_chunks` slices the
    dispatch rows: together well under one block's working set (measured 0.59x; sublayer alone 0.80x)."""
    sliced = _temps("full", "model.remat_scope=sublayer", "model.moe_token_chunks=4")
    assert sliced < 0.8 * full_block, (sliced, full_block)
