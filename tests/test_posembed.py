"""Position-embedding and patch-kernel resizing: identities, PI-resize's defining property, golden values,
gradients."""
import pytest
import torch
import torch.nn.functional as F

from pks4.layers.posembed import (
    inflate_patch_kernel,
    pi_resize_matrix,
    resize_patch_kernel,
    resize_pos_embed_2d,
    resize_temporal_pos_embed,
)


@pytest.mark.parametrize("batched", [False, True])
def test_bicubic_resize_to_same_size_is_identity(batched):
    pos = torch.randn(1 + 7 * 7, 16)
    pos = pos.unsqueeze(0) if batched else pos
    out = resize_pos_embed_2d(pos, (7, 7))
    assert out.shape == pos.shape
    torch.testing.assert_close(out, pos, rtol=0, atol=1e-6)


def test_resize_pos_embed_shapes_prefix_and_layout():
    d = 8
    grid = torch.randn(3, 4, d)  # (H, W, D), row-major flattening
    pos = torch.cat([torch.randn(2, d), grid.reshape(12, d)])
    out = resize_pos_embed_2d(pos, (6, 8), old_hw=(3, 4), num_prefix=2)
    assert out.shape == (2 + 48, d)
    torch.testing.assert_close(out[:2], pos[:2], rtol=0, atol=0)  # prefix tokens untouched
    ref = F.interpolate(grid.permute(2, 0, 1)[None], size=(6, 8), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[2:], ref[0].permute(1, 2, 0).reshape(48, d))


def test_resize_pos_embed_constant_stays_constant_and_keeps_dtype():
    pos = torch.full((1 + 16, 4), 0.25, dtype=torch.bfloat16)
    out = resize_pos_embed_2d(pos, 6)
    assert out.dtype == torch.bfloat16 and out.shape == (37, 4)
    torch.testing.assert_close(out.float(), torch.full((37, 4), 0.25))


def test_resize_pos_embed_rejects_bad_shapes():
    with pytest.raises(ValueError, match="not a square"):
        resize_pos_embed_2d(torch.randn(1 + 12, 4), 5)
    with pytest.raises(ValueError, match="old_hw"):
        resize_pos_embed_2d(torch.randn(1 + 12, 4), 5, old_hw=(3, 3))


def test_resize_pos_embed_is_differentiable():
    pos = torch.randn(1 + 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: resize_pos_embed_2d(p, (4, 5)), (pos,))


def test_temporal_resize_golden_and_identity():
    pos = torch.tensor([[[0.0, 10.0], [1.0, 20.0]]])  # (1, T=2, D=2)
    out = resize_temporal_pos_embed(pos, 3)
    # align_corners=False: sources at -1/6, 1/2, 7/6 -> clamped ends, midpoint in between
    torch.testing.assert_close(out, torch.tensor([[[0.0, 10.0], [0.5, 15.0], [1.0, 20.0]]]))
    x = torch.randn(1, 8, 5)
    torch.testing.assert_close(resize_temporal_pos_embed(x, 8), x)
    assert resize_temporal_pos_embed(torch.randn(8, 5), 4).shape == (4, 5)


def _patch_response(x, w):
    return torch.einsum("bchw,dchw->bd", x, w)


@pytest.mark.parametrize("old, new", [(4, 6), (8, 16), ((4, 4), (5, 7))])
def test_pi_resize_preserves_patch_response_when_upsampling(old, new):
    old = (old, old) if isinstance(old, int) else old
    new = (new, new) if isinstance(new, int) else new
    w = torch.randn(5, 3, *old, dtype=torch.float64)
    x = torch.randn(10, 3, *old, dtype=torch.float64)
    x_resized = F.interpolate(x, size=new, mode="bilinear", align_corners=False)
    w_pi = resize_patch_kernel(w, new, method="pi")
    assert w_pi.shape == (5, 3, *new)
    torch.testing.assert_close(_patch_response(x_resized, w_pi), _patch_response(x, w))
    # bicubic kernel resize does NOT keep the response (it grows with the patch area): the test can fail
    w_bic = resize_patch_kernel(w, new, method="bicubic")
    assert not torch.allclose(_patch_response(x_resized, w_bic), _patch_response(x, w), rtol=1e-2)


def test_pi_resize_downsampling_is_least_squares():
    w = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    w_pi = resize_patch_kernel(w, 4, method="pi")
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    rt = F.interpolate(basis, size=(4, 4), mode="bilinear", align_corners=False).reshape(64, 16)
    assert pi_resize_matrix((8, 8), (4, 4)).shape == (64, 16)
    # normal equations of min ||R^T w_new - w||: R (R^T w_new - w) = 0
    residual = w_pi.reshape(8, 16) @ rt.T - w.reshape(8, 64)
    torch.testing.assert_close(residual @ rt, torch.zeros(8, 16, dtype=torch.float64), rtol=0, atol=1e-9)


def test_resize_patch_kernel_3d_and_identity_and_grad():
    w = torch.randn(6, 3, 2, 4, 4, requires_grad=True)
    out = resize_patch_kernel(w, (6, 6))
    assert out.shape == (6, 3, 2, 6, 6)
    torch.testing.assert_close(resize_patch_kernel(w, 4), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(resize_patch_kernel(w, 4, method="pi"), w, rtol=0, atol=1e-5)
    resize_patch_kernel(w, 6, method="pi").sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    # frames resized independently
    torch.testing.assert_close(out[:, :, 1], resize_patch_kernel(w[:, :, 1], (6, 6)))


@pytest.mark.parametrize("kt", [1, 2, 4])
def test_inflate_repeat_avg_static_clip_gives_image_response(kt):
    w2d = torch.randn(8, 3, 4, 4)
    w3d = inflate_patch_kernel(w2d, kt)
    assert w3d.shape == (8, 3, kt, 4, 4)
    frame = torch.randn(2, 3, 8, 8)
    clip = frame.unsqueeze(2).expand(-1, -1, kt, -1, -1)
    y3 = F.conv3d(clip, w3d, stride=(kt, 4, 4))[:, :, 0]
    torch.testing.assert_close(y3, F.conv2d(frame, w2d, stride=4), rtol=1e-5, atol=1e-5)


def test_inflate_center_picks_middle_frame():
    w2d = torch.randn(8, 3, 4, 4)
    w3d = inflate_patch_kernel(w2d, 3, mode="center")
    clip = torch.randn(2, 3, 3, 8, 8)
    y3 = F.conv3d(clip, w3d, stride=(3, 4, 4))[:, :, 0]
    torch.testing.assert_close(y3, F.conv2d(clip[:, :, 1], w2d, stride=4), rtol=1e-5, atol=1e-5)
    assert w3d[:, :, [0, 2]].abs().sum() == 0
    with pytest.raises(ValueError):
        inflate_patch_kernel(w2d, 2, mode="middle")
