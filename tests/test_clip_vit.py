"""CLIP vision tower: OpenAI key layout, parameter counts, block-range splitting, resolution changes,
activation checkpointing."""
from dataclasses import replace

import pytest
import torch

from pks4.layers.posembed import resize_pos_embed_2d
from pks4.models.clip_vit import (
    CLIP_VIT_B16,
    CLIP_VIT_L14,
    CLIP_VIT_TINY,
    CLIPVisionConfig,
    CLIPVisionTransformer,
)

SMALL = replace(CLIP_VIT_TINY, image_size=32, patch_size=8, layers=3)


def _n_params(cfg: CLIPVisionConfig) -> int:
    with torch.device("meta"):  # no memory, no forward: the big towers are only counted
        return sum(p.numel() for p in CLIPVisionTransformer(cfg).parameters())


def test_parameter_counts():
    assert _n_params(CLIP_VIT_B16) == 86_192_640  # 86.19M incl. proj 768x512
    # L/14 by hand: conv 1024*3*14*14 + cls 1024 + pos 257*1024 + 2 LN * 2048
    #   + 24 * (12 * 1024^2 + 13 * 1024) + proj 1024*768
    expected_l14 = 602_112 + 1024 + 263_168 + 2 * 2048 + 24 * (12 * 1024**2 + 13 * 1024) + 786_432
    assert _n_params(CLIP_VIT_L14) == expected_l14 == 303_966_208
    assert _n_params(CLIP_VIT_TINY) < 3_000_000


def test_state_dict_keys_are_openai_vision_keys():
    model = CLIPVisionTransformer(SMALL)
    per_block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                 "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"]
    expected = {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
                "ln_post.weight", "ln_post.bias", "proj"}
    expected |= {f"transformer.resblocks.{i}.{k}" for i in range(SMALL.layers) for k in per_block}
    sd = model.state_dict()
    assert set(sd) == expected
    assert model.no_weight_decay() <= expected
    d = SMALL.width
    assert sd["conv1.weight"].shape == (d, 3, 8, 8)
    assert sd["positional_embedding"].shape == (1 + 16, d)
    assert sd["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * d, d)
    assert sd["proj"].shape == (d, SMALL.output_dim)
    assert set(CLIPVisionTransformer(replace(SMALL, output_dim=None)).state_dict()) == expected - {"proj"}


def test_embed_and_encode_compose():
    model = CLIPVisionTransformer(SMALL).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens = model.embed(images)
    assert tokens.shape == (2, 1 + 16, SMALL.width)
    # embed by hand: conv, CLS first, position embedding, ln_pre
    patches = model.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([model.class_embedding.expand(2, 1, -1), patches], 1) + model.positional_embedding
    torch.testing.assert_close(tokens, model.ln_pre(x))
    feats = model.forward_features(images)
    assert feats.shape == (2, SMALL.width)
    torch.testing.assert_close(feats, model.ln_post(model.forward_blocks(tokens)[:, 0]))
    torch.testing.assert_close(model.encode_image(images), feats @ model.proj)
    torch.testing.assert_close(model(images), model.encode_image(images))


def test_forward_blocks_split_equals_full_run():
    model = CLIPVisionTransformer(SMALL).eval()
    x = model.embed(torch.randn(2, 3, 32, 32))
    full = model.forward_blocks(x)
    split = model.forward_blocks(model.forward_blocks(x, 0, 2), 2, None)
    torch.testing.assert_close(split, full)
    torch.testing.assert_close(model.forward_blocks(x, 1, 1), x)
    with pytest.raises(ValueError, match="block range"):
        model.forward_blocks(x, 2, 5)


def test_other_resolution_interpolates_position_embedding():
    model = CLIPVisionTransformer(SMALL).eval()
    assert model.grid_size(48, 64) == (6, 8)
    with pytest.raises(ValueError, match="patch size 8"):
        model.grid_size(30, 32)
    images = torch.randn(1, 3, 48, 64)
    tokens = model.embed(images)
    assert tokens.shape == (1, 1 + 48, SMALL.width)
    # a tower built natively at 48x64-equivalent with the resized embedding gives the same tokens
    pos = resize_pos_embed_2d(model.positional_embedding.detach(), (6, 8))
    patches = model.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([model.class_embedding.expand(1, 1, -1), patches], 1) + pos
    torch.testing.assert_close(tokens, model.ln_pre(x))
    assert model.encode_image(images).shape == (1, SMALL.output_dim)


def test_gradients_flow_through_resized_position_embedding():
    model = CLIPVisionTransformer(SMALL)
    model.encode_image(torch.randn(1, 3, 40, 40)).sum().backward()
    assert model.positional_embedding.grad is not None
    assert model.positional_embedding.grad[1:].abs().sum() > 0


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(1)
    a = CLIPVisionTransformer(SMALL)
    b = CLIPVisionTransformer(SMALL)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    images = torch.randn(2, 3, 32, 32)
    a.encode_image(images).square().sum().backward()
    b.encode_image(images).square().sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, msg=name)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        CLIPVisionConfig(image_size=100, patch_size=16)
    with pytest.raises(ValueError, match="divisible by heads"):
        CLIPVisionConfig(width=100, heads=3)
    gelu = CLIPVisionTransformer(replace(SMALL, quick_gelu=False))
    assert type(gelu.blocks[0].mlp.act).__name__ == "GELU"
