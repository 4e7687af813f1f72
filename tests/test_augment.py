"""gradjax.augment: random shifts / crops with padding (no flips), and the loss-function wrapper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradjax import augment as A
from gradjax.train import StepContext


def _images(b=5, h=7, w=6, c=2, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.1, 1.0, (b, h, w, c)).astype(np.float32))


def test_shift_moves_content_exactly_and_fills_the_border():
    x = _images()
    p = 3
    shifts = jnp.array([[0, 0], [1, -2], [-3, 3], [2, 0], [-1, -1]], jnp.int32)
    out = np.asarray(A.shift_images(x, shifts, max_shift=p, fill=-7.0))
    xn = np.asarray(x)
    B, H, W, C = xn.shape
    for b in range(B):
        sy, sx = (int(v) for v in shifts[b])
        for i in range(H):
            for j in range(W):
                if 0 <= i + sy < H and 0 <= j + sx < W:
                    np.testing.assert_array_equal(out[b, i, j], xn[b, i + sy, j + sx])
                else:
                    np.testing.assert_array_equal(out[b, i, j], -7.0)
    np.testing.assert_array_equal(out[0], xn[0])  # zero shift is the identity


def test_shift_preserves_pixel_content_inside_the_window():
    """The multiset of kept pixel values is exactly the original's, less those moved out of the window."""
    x = _images(b=1, h=9, w=9, c=1, seed=3)
    out = np.asarray(A.shift_images(x, jnp.array([[2, -1]]), max_shift=2, fill=0.0))[0, ..., 0]
    src = np.asarray(x)[0, ..., 0]
    kept = src[2:, :-1]  # rows 2..8, cols 0..7 land on rows 0..6, cols 1..8
    np.testing.assert_array_equal(np.sort(out[out > 0]), np.sort(kept.ravel()))
    assert np.count_nonzero(out == 0) == 9 * 9 - kept.size


def test_random_crop_keys_reproduce_and_cover_every_shift_without_flips():
    x = _images(b=400, h=5, w=5, c=1, seed=1)
    k = jax.random.PRNGKey(4)
    a, b = A.random_crop(k, x, padding=2), A.random_crop(k, x, padding=2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(A.random_crop(jax.random.PRNGKey(5), x, padding=2)))
    s = np.asarray(A.random_shifts(k, 400, max_shift=2))
    assert s.min() == -2 and s.max() == 2
    assert len({tuple(r) for r in s}) == 25  # every (s_y, s_x) in {-2..2}^2 occurs
    # each crop is exactly the shift that random_shifts drew with the same key: no flip, no other transform
    np.testing.assert_array_equal(np.asarray(a), np.asarray(A.shift_images(x, jnp.asarray(s), max_shift=2)))
    # a horizontally asymmetric digit-like image never comes back mirrored
    img = np.zeros((1, 5, 5, 1), np.float32)
    img[0, :, 0] = 1.0  # a bar on the left edge
    crops = np.asarray(A.random_crop(k, jnp.repeat(jnp.asarray(img), 64, 0), padding=1))
    assert np.all(crops[:, :, 3:] == 0.0)  # the bar can move right by at most one pixel, never to the right edge


def test_augmented_loss_fn_crops_with_a_key_from_the_step():
    seen = []

    def loss_fn(params, model_state, batch, ctx):
        seen.append(batch["image"])
        return jnp.sum(batch["image"]), {}

    x = _images(b=3, h=6, w=6, c=1)
    ctx = StepContext(rng=jax.random.PRNGKey(9), step=jnp.int32(0), frozen=None)
    wrapped = A.augmented_loss_fn(loss_fn, padding=2)
    wrapped(None, {}, {"image": x, "label": jnp.zeros(3, jnp.int32)}, ctx)
    want = A.random_crop(jax.random.fold_in(ctx.rng, A.AUGMENT_SALT), x, padding=2)
    np.testing.assert_array_equal(np.asarray(seen[-1]), np.asarray(want))
    assert A.augmented_loss_fn(loss_fn, padding=0) is loss_fn


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="max_shift"):
        A.random_shifts(jax.random.PRNGKey(0), 3, max_shift=-1)
    with pytest.raises(ValueError, match="images"):
        A.random_crop(jax.random.PRNGKey(0), jnp.zeros((3, 4, 4)), padding=1)
    with pytest.raises(ValueError, match="shifts"):
        A.shift_images(jnp.zeros((3, 4, 4, 1)), jnp.zeros((2, 2), jnp.int32), max_shift=1)
    with pytest.raises(ValueError, match="padding"):
        A.augmented_loss_fn(lambda *a: None, padding=-1)
