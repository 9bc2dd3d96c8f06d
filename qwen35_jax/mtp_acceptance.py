"""Teacher-forced MTP acceptance: how often the MTP head's draft equals what the main model would emit.

The main model runs over real text; `main[t] = argmax logits[t]` is its prediction of token t+1. Draft position 1
at t: the MTP head takes h_t and the true token t+1 and drafts token t+2; it is accepted when it equals
`main[t+1]`. Draft position k > 1 chains: the head takes its own previous hidden state and draft (at position
t + k - 1) and drafts token t+k+1, compared with `main[t+k]`. The chain runs over the whole sequence at once, so
the MTP attention layer at depth k attends to earlier positions' depth-k inputs (in cached decoding it would see
the accepted true prefix instead): an approximation for k > 1, exact for k = 1. Reported per draft position:
`agree` (the draft matches), `prefix` (it and every earlier draft match: what greedy verification accepts), and a
`control`: how often the draft equals the main prediction one step later (`main[t+k+1]`), counted only where that
shifted target differs from the true one (`main[t+k+1] != main[t+k]`), so a draft aligned with its target cannot
score on it and a draft that is off by one position scores as high as its agreement: it must be near 0 (without
that condition, text that repeats tokens, such as runs of indentation, scores "the next token again" as a match).
Only positions whose targets lie in the same document are counted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax.model import default_inputs, module_for


@functools.partial(jax.jit, static_argnums=(0, 1))
def _counts(cfg, depth, params, tokens_BT, segment_ids_BT, positions_BT):
    model = module_for(cfg)
    logits, aux = model.apply({"params": params}, tokens_BT, segment_ids_BT, positions_BT)
    main_BT = jnp.argmax(logits, -1)
    T = tokens_BT.shape[1]
    seg = segment_ids_BT

    def shifted(x_BT, k, fill=0):  # x[t + k], `fill` past the end
        return jnp.concatenate([x_BT[:, k:], jnp.full((x_BT.shape[0], min(k, T)), fill, x_BT.dtype)], 1)[:, :T]

    def same_doc(k):
        return (seg != 0) & (shifted(seg, k, -1) == seg)

    h, nxt = aux["hidden"], shifted(tokens_BT, 1)
    out, ok_prefix = [], jnp.ones(tokens_BT.shape, bool)
    for k in range(1, depth + 1):
        mtp_logits, h, _, _ = model.apply({"params": params}, h, nxt, seg, positions_BT + (k - 1),
                                          method="mtp_logits")
        draft = jnp.argmax(mtp_logits, -1)
        valid = same_doc(k + 1)
        agree = (draft == shifted(main_BT, k)) & valid
        ok_prefix = ok_prefix & agree
        control_valid = same_doc(k + 2) & (shifted(main_BT, k + 1) != shifted(main_BT, k))
        control = (draft == shifted(main_BT, k + 1)) & control_valid
        out.append(jnp.stack([valid.sum(), agree.sum(), ok_prefix.sum(), control_valid.sum(), control.sum()]))
        nxt = draft
    return jnp.stack(out)


def measure(cfg, params, batches, depth: int = 1) -> list[dict]:
    """Per draft position k = 1..depth: {"draft": k, "positions", "agree", "prefix", "control"} (shares) over
    `batches` (mappings with "tokens" [B, T] and optionally "segment_ids", "positions")."""
    if not cfg.mtp_num_layers:
        raise ValueError(f"model {cfg.name!r} has no MTP head (mtp_num_layers=0)")
    total = np.zeros((depth, 5), np.int64)
    for batch in batches:
        tokens = jnp.asarray(batch["tokens"], jnp.int32)
        seg, pos = default_inputs(tokens, batch.get("segment_ids"), batch.get("positions"))
        total += np.asarray(_counts(cfg, depth, params, tokens, seg, pos), np.int64)
    rows = []
    for k, (n, agree, prefix, n_control, control) in enumerate(total, start=1):
        rows.append({"draft": k, "positions": int(n), "agree": agree / max(n, 1), "prefix": prefix / max(n, 1),
                     "control": control / max(n_control, 1)})
    return rows


def format_table(rows) -> str:
    lines = ["draft  positions  agree   prefix  control(shifted)"]
    lines += [f"{r['draft']:>5}  {r['positions']:>9}  {r['agree']:.4f}  {r['prefix']:.4f}  {r['control']:.4f}"
              for r in rows]
    return "\n".join(lines)


def hf_eval_main(path, overrides, depth: int) -> dict:
    """`qwen35 eval HF_FOLDER --mtp-acceptance K [eval_data=... tokenizer=... seq_len=...]`: the folder's model on
    the eval data of the embedded default training config (with overrides)."""
    from qwen35_jax import hf
    from qwen35_jax.train import data as train_data
    from qwen35_jax.train.config import load_train_config

    cfg, params = hf.load(path)
    tcfg = load_train_config(None, overrides)
    tokenizer = train_data.tokenizer_for(tcfg)
    rows = measure(cfg, params, train_data.eval_batches(tcfg, tokenizer), depth)
    return {"path": str(path), "mtp_acceptance": rows}
