"""`losses.cross_entropy_sum` (the trainer's CE and logit z-loss sums) against the plain formula in float64: values
and gradients with respect to the logits and the mask, both sums weighted, padding positions and a fractional mask,
bf16 logits cast to fp32."""

import jax
import jax.numpy as jnp
import numpy as np

from qwen35_jax.train.losses import cross_entropy_sum


def _plain_float64(logits, targets, mask):
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - target_logit) * mask), jnp.sum(jnp.square(lse) * mask)


def _weighted(fn):
    def loss(logits, mask, targets):
        ce, z = fn(logits, targets, mask)
        return 0.7 * ce + 0.3 * z
    return loss


def test_cross_entropy_values_and_gradients_equal_float64_autodiff():
    rng = np.random.default_rng(0)
    logits = (3 * rng.normal(size=(2, 5, 37))).astype(np.float32)
    targets = rng.integers(0, 37, (2, 5)).astype(np.int32)
    mask = np.ones((2, 5), np.float32)
    mask[1, 3:] = 0  # padding
    mask[0, 1] = 0.5  # a weighted token: the mask's gradient is the token's loss
    ours = jax.value_and_grad(_weighted(cross_entropy_sum), argnums=(0, 1))(
        jnp.asarray(logits), jnp.asarray(mask), jnp.asarray(targets))
    with jax.enable_x64(True):
        ref = jax.value_and_grad(_weighted(_plain_float64), argnums=(0, 1))(
            jnp.asarray(logits, jnp.float64), jnp.asarray(mask, jnp.float64), jnp.asarray(targets))
        ref = jax.tree.map(np.asarray, ref)
    assert abs(float(ours[0]) - float(ref[0])) <= 1e-5 * abs(float(ref[0]))
    for name, a, b in zip(("logits", "mask"), ours[1], ref[1]):
        assert np.max(np.abs(np.asarray(a, np.float64) - b)) <= 1e-5 * np.max(np.abs(b)), name
    assert np.all(np.asarray(ours[1][0])[1, 3:] == 0)  # padded positions get no gradient


def test_cross_entropy_of_bf16_logits_gives_a_bf16_gradient_of_the_fp32_loss():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(1, 4, 16)), jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, 16, (1, 4)), jnp.int32)
    mask = jnp.ones((1, 4), bool)
    g = jax.grad(lambda x: cross_entropy_sum(x, targets, mask)[0])(logits)
    assert g.dtype == jnp.bfloat16
    ref = jax.grad(lambda x: _plain_float64(x, targets, jnp.ones((1, 4), jnp.float32))[0])(logits.astype(jnp.float32))
    assert np.max(np.abs(np.asarray(g, np.float32) - np.asarray(ref))) <= 1e-2
