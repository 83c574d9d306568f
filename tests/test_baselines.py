"""The two baselines: parameter counts against the papers, identity at initialisation, temporal mixing."""
import pytest
import torch

from pks4.models.registry import count_parameters, create_model


def _meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def test_param_counts_b16():
    # CLIP ViT-B/16 tower 86,192,640 (NOTES.md: 86.19M) + a 512 -> 174 head (89,262).
    joint = _meta("vit_b16_joint")
    assert count_parameters(joint) == 86_192_640 + 8 * 768 + 89_262
    st = _meta("stadapter_vit_b16")
    per_adapter = 768 * 384 + 384 + 384 * 3 + 384 + 384 * 768 + 768  # down, depthwise (3,1,1) conv, up
    assert count_parameters(st, trainable_only=True) == 12 * per_adapter + 89_262  # ST-Adapter's "7M" (Table 1)
    assert count_parameters(st) == 86_192_640 + 12 * per_adapter + 89_262


def test_stadapter_l14_matches_table1():
    st = _meta("stadapter_vit_l14")
    per_adapter = 1024 * 384 + 384 + 384 * 3 + 384 + 384 * 1024 + 1024
    head = 768 * 174 + 174
    assert count_parameters(st, trainable_only=True) == 24 * per_adapter + head  # 19.08M; PKS4 Table 1: "20M"


def _frame_average_tiny():
    return create_model("vit_tiny_avgpool").eval()


def _shared_backbone(model, reference):
    model.backbone.load_state_dict(reference.backbone.state_dict())
    model.head.load_state_dict(reference.head.state_dict())
    return model.eval()


def test_stadapter_starts_as_the_frame_average_model():
    ref = _frame_average_tiny()
    st = _shared_backbone(create_model("stadapter_vit_tiny"), ref)
    x = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(st(x), ref(x))


def test_joint_vit_on_one_frame_is_the_image_model():
    ref = _frame_average_tiny()
    joint = _shared_backbone(create_model("vit_tiny_joint"), ref)
    x = torch.randn(2, 1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(joint(x), ref(x), rtol=1e-4, atol=1e-5)


def test_adapter_mixes_exactly_the_neighbouring_frames():
    from pks4.models.baselines import STAdapter

    ad = STAdapter(16, 8, kernel_t=3)
    torch.nn.init.normal_(ad.up.weight)
    x = torch.randn(1, 4, 1 + 9, 16)
    x2 = x.clone()
    x2[:, 2, 1:] += 1.0  # change the patch tokens of frame 2
    with torch.no_grad():
        d = (ad(x2, (3, 3)) - ad(x, (3, 3)) - (x2 - x)).abs().amax(dim=(2, 3))[0]  # adapter change per frame
    assert d[0] == 0 and d[1] > 0 and d[2] > 0 and d[3] > 0  # a (3, 1, 1) kernel reaches t-1..t+1 only
    torch.testing.assert_close(ad(x2, (3, 3))[:, :, 0], x2[:, :, 0])  # CLS bypasses the adapter


def test_joint_attention_is_not_frame_wise():
    model = create_model("vit_tiny_joint").eval()
    x = torch.randn(1, 3, 3, 64, 64)
    with torch.no_grad():
        clip = model.forward_features(x)
        alone = torch.stack([model.forward_features(x[:, t : t + 1]) for t in range(3)]).mean(0)
    assert not torch.allclose(clip, alone, atol=1e-3)


def test_stadapter_trains_adapters_only():
    model = create_model("stadapter_vit_tiny")
    loss = model(torch.randn(2, 4, 3, 64, 64)).logsumexp(-1).sum()
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.adapters.parameters())
    assert model.is_new_parameter("adapters.0.down.weight") and not model.is_new_parameter("backbone.conv1.weight")


def test_joint_vit_other_frame_counts_and_interface():
    model = create_model("vit_tiny_joint", num_frames=4)
    assert model(torch.randn(1, 6, 3, 64, 64)).shape == (1, 10)  # temporal embedding interpolated 4 -> 6
    assert "temporal_embedding" in model.no_weight_decay()
    assert model.layer_id("backbone.transformer.resblocks.2.attn.in_proj_weight") == 3
    assert model.layer_id("temporal_embedding") == model.num_layers + 1
    model.set_grad_checkpointing(True)
    model(torch.randn(1, 2, 3, 64, 64)).sum().backward()
    with pytest.raises(ValueError, match="expects clips"):
        model(torch.randn(1, 3, 64, 64))
