"""The BEiT-style ViT that official SimMIM ViT checkpoints import onto (and vit-base-224 is):
a tiny one trains and embeds like every encoder of the "vit" family."""

from __future__ import annotations

import pytest
import torch

from simmim_core.nn.encoders import BEiTEncoder
from simmim_core.nn.model import ModelConfig, SimMIM
from training.presets import SIMMIM_VIT_KWARGS


def tiny_beit(**overrides) -> SimMIM:
    torch.manual_seed(0)
    kwargs = SIMMIM_VIT_KWARGS | dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
    cfg = ModelConfig(
        family="vit",
        arch="beit_base_patch16_224",
        image_size=32,
        in_chans=3,
        encoder_kwargs=kwargs,
        mask_patch_size=8,
        **overrides,
    )
    return SimMIM(cfg)


def test_a_beit_arch_builds_the_beit_encoder_with_one_shared_position_bias():
    model = tiny_beit()
    assert isinstance(model.encoder, BEiTEncoder)
    names = [n for n, _ in model.named_parameters() if "relative_position_bias_table" in n]
    assert names == ["encoder.vit.rel_pos_bias.relative_position_bias_table"]


def test_every_parameter_gets_a_gradient_from_the_masked_pixel_loss():
    model = tiny_beit().train()
    pixels = torch.randn(2, 3, 32, 32)
    mask = (torch.rand(2, 8, 8) < 0.6).float()
    loss, _, recon = model(pixels, mask)
    loss.backward()
    assert recon.shape == pixels.shape
    lacking = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert lacking == []


def test_masked_patches_are_replaced_before_the_encoder_sees_them():
    model = tiny_beit().eval()
    pixels = torch.randn(1, 3, 32, 32)
    mask = torch.zeros(1, 8, 8)
    mask[0, :2, :] = 1  # the top 8 pixel rows
    changed = pixels.clone()
    changed[:, :, :8] = torch.randn(1, 3, 8, 32)
    with torch.no_grad():
        assert torch.equal(model.reconstruct(pixels, mask), model.reconstruct(changed, mask))
        assert not torch.equal(model.embed(pixels), model.embed(changed))


@pytest.mark.parametrize("pooling, dim", [("mean", 32), ("cls", 32), ("grid2", 128)])
def test_each_pooling_embeds_at_any_feature_layer(pooling, dim):
    last, first = tiny_beit(pooling=pooling).eval(), tiny_beit(pooling=pooling, feature_layer=1)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a, b = last.embed(pixels), first.eval().embed(pixels)
    assert a.shape == b.shape == (3, dim) and not torch.allclose(a, b)
