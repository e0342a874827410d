"""The SimMIM module: where the mask is applied, what the encoder reports, where gradients go.

ViT and Swin: masked patch tokens are replaced by one learned mask_token after patch embedding,
before position embeddings (x * (1 - w) + mask_token * w); every token goes through the encoder.
CNNs: masked pixels are filled with 0, the dataset mean after normalisation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import TINY_ENCODERS, tiny_config, tiny_model

from simmim_core.masking import MaskGenerator
from simmim_core.nn.decoders import LinearDecoder, TransformerDecoder, create_decoder
from simmim_core.nn.encoders import create_encoder
from simmim_core.nn.losses import upsample_mask

FAMILIES = list(TINY_ENCODERS)


def random_mask(model, n: int, seed: int = 0) -> torch.Tensor:
    cfg = model.cfg
    gen = MaskGenerator(cfg.image_size, cfg.mask_patch_size, model.patch_size, cfg.mask_ratio)
    return torch.from_numpy(gen(np.random.default_rng(seed), n))


def random_pixels(model, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = model.cfg.image_size
    return torch.randn(n, model.cfg.in_chans, size, size, generator=g)


# ---- what each encoder reports ----------------------------------------------------------------


@pytest.mark.parametrize(
    "family, stride, grid, dim",
    [
        ("vit", 4, (8, 8), 32),  # ViT patch 4 at 32 px: stride = patch size
        ("swin", 32, (16, 16), 128),  # Swin patch 4, 4 stages: stride 32, dim 16 * 2^3
        ("cnn", 32, (8, 8), 512),  # resnet10t: stride 32; mask cells of 8 px at 64 px
    ],
)
def test_encoder_reports_its_stride_mask_grid_and_embedding_size(family, stride, grid, dim):
    enc = tiny_model(family).encoder
    assert (enc.stride, enc.grid, enc.embed_dim) == (stride, grid, dim)


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_has_the_input_shape_and_is_finite(family):
    model = tiny_model(family)
    pixels = random_pixels(model, 2)
    recon = model.reconstruct(pixels, random_mask(model, 2))
    assert recon.shape == pixels.shape
    assert torch.isfinite(recon).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_token_goes_through_the_encoder(family):
    # SimMIM encodes the whole grid (masked and visible), unlike MAE
    model = tiny_model(family)
    fmap, _ = model.encoder.forward_features(random_pixels(model, 2), random_mask(model, 2))
    size = model.cfg.image_size // model.encoder.stride
    assert fmap.shape == (2, model.embed_dim, size, size)


def test_three_channel_inputs_are_supported():
    model = tiny_model("vit", in_chans=3)
    pixels = random_pixels(model, 2)
    loss, _, recon = model(pixels, random_mask(model, 2))
    assert recon.shape == (2, 3, 32, 32) and torch.isfinite(loss)


def test_unknown_family_raises_value_error():
    with pytest.raises(ValueError, match="mlp"):
        create_encoder("mlp", "resnet18", 64, 1)


def test_mask_patch_not_divisible_by_the_model_patch_raises_value_error_naming_both():
    with pytest.raises(ValueError, match=r"6.*4"):
        tiny_model("vit", mask_patch_size=6)


# ---- where the mask is applied ----------------------------------------------------------------


def capture_vit_tokens_before_pos_embed(encoder, store: list):
    """Record what ViT's _pos_embed receives: patch tokens after the mask-token blending."""
    original = encoder.vit._pos_embed

    def spy(x):
        store.append(x.detach().clone())
        return original(x)

    encoder.vit._pos_embed = spy


def test_vit_mask_token_replaces_exactly_the_masked_tokens_before_position_embeddings():
    model = tiny_model("vit").eval()
    enc = model.encoder
    pixels, mask = random_pixels(model, 3), random_mask(model, 3)
    seen = []
    capture_vit_tokens_before_pos_embed(enc, seen)
    with torch.no_grad():
        enc.forward_features(pixels, mask)
        plain = enc.vit.patch_embed(pixels)  # [N, L, D]
    tokens = seen[0]
    assert tokens.shape == plain.shape  # no cls yet, no pos embed
    w = mask.flatten(1).bool()  # [N, L]
    assert torch.equal(tokens[~w], plain[~w])  # visible: untouched
    assert torch.equal(tokens[w], enc.mask_token[0].expand(int(w.sum()), -1))


def test_vit_without_a_mask_sees_plain_patch_embeddings():
    model = tiny_model("vit").eval()
    pixels = random_pixels(model, 2)
    seen = []
    capture_vit_tokens_before_pos_embed(model.encoder, seen)
    with torch.no_grad():
        model.encoder.forward_features(pixels)
        assert torch.equal(seen[0], model.encoder.vit.patch_embed(pixels))


def test_swin_mask_token_replaces_exactly_the_masked_tokens_after_patch_embedding():
    model = tiny_model("swin").eval()
    enc = model.encoder
    pixels, mask = random_pixels(model, 3), random_mask(model, 3)
    seen = []
    enc.swin.layers.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    with torch.no_grad():
        enc.forward_features(pixels, mask)
        plain = enc.swin.patch_embed(pixels)  # [N, h, w, C] (NHWC)
    tokens = seen[0]
    assert tokens.shape == plain.shape
    w = mask.bool()  # [N, h, w]
    assert torch.equal(tokens[~w], plain[~w])
    assert torch.equal(tokens[w], enc.mask_token.reshape(1, -1).expand(int(w.sum()), -1))


def capture_cnn_input(encoder, store: list):
    original = encoder.cnn.forward_features

    def spy(x):
        store.append(x.detach().clone())
        return original(x)

    encoder.cnn.forward_features = spy


def test_cnn_fills_masked_pixels_with_zero_the_mean_after_normalisation():
    model = tiny_model("cnn").eval()
    pixels, mask = random_pixels(model, 3), random_mask(model, 3)
    seen = []
    capture_cnn_input(model.encoder, seen)
    with torch.no_grad():
        model.encoder.forward_features(pixels, mask)
    m = upsample_mask(mask, model.patch_size).bool().expand_as(pixels)
    assert torch.equal(seen[0][m], torch.zeros(int(m.sum())))
    assert torch.equal(seen[0][~m], pixels[~m])


def test_cnn_noise_fill_puts_noise_in_masked_pixels_while_training_and_zero_in_eval():
    model = tiny_model("cnn", encoder_kwargs=dict(patch_size=8, fill="noise"))
    pixels, mask = random_pixels(model, 2), random_mask(model, 2)
    m = upsample_mask(mask, model.patch_size).bool().expand_as(pixels)
    seen = []
    capture_cnn_input(model.encoder, seen)
    with torch.no_grad():
        model.train().encoder.forward_features(pixels, mask)
        model.eval().encoder.forward_features(pixels, mask)
    noisy, filled = seen
    assert torch.equal(noisy[~m], pixels[~m])
    assert noisy[m].std() > 0.5  # ~N(0, 1), not a constant
    assert torch.equal(filled[m], torch.zeros(int(m.sum())))


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_pixels_cannot_leak_into_the_features(family):
    # whatever is under the mask, the encoder sees the same thing; visible pixels do matter
    model = tiny_model(family).eval()
    pixels, mask = random_pixels(model, 2), random_mask(model, 2)
    m = upsample_mask(mask, model.patch_size).bool().expand_as(pixels)
    other = torch.where(m, torch.randn_like(pixels) * 5, pixels)
    changed_visible = torch.where(m, pixels, pixels + 1.0)
    with torch.no_grad():
        ref, _ = model.encoder.forward_features(pixels, mask)
        same, _ = model.encoder.forward_features(other, mask)
        diff, _ = model.encoder.forward_features(changed_visible, mask)
    assert torch.equal(ref, same)
    assert not torch.allclose(ref, diff)


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_mask_token_is_one_small_random_vector_of_the_token_width(family):
    # SimMIM: trunc_normal_(std=0.02), one token shared by every masked position
    enc = tiny_model(family).encoder
    width = enc.embed_dim if family == "vit" else enc.swin.embed_dim
    assert enc.mask_token.numel() == width
    assert 0 < enc.mask_token.abs().max() < 0.1


# ---- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, sim_loss",
    [
        ("vit", "none"),
        ("swin", "none"),
        ("cnn", "none"),
        ("vit", "cosine"),
        ("vit", "perceptual"),
        ("vit", "contrastive"),
    ],
)
def test_every_trainable_parameter_gets_a_finite_gradient(family, sim_loss):
    model = tiny_model(family, sim_loss=sim_loss).train()
    pixels, mask = random_pixels(model, 4), random_mask(model, 4)
    loss, _, _ = model(pixels, mask, pixels.flip(-1))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not bad, f"non-finite gradient for {bad}"


@pytest.mark.parametrize(
    "arch, head", [("convnext_atto", "head.norm"), ("mobilenetv3_small_050", "conv_head")]
)
def test_cnn_parameters_outside_forward_features_are_frozen_so_ddp_sees_only_used_ones(arch, head):
    # the classifier head's norm / conv is never run: it must not wait for a gradient
    model = tiny_model("cnn", arch=arch)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {f"encoder.cnn.{head}.weight", f"encoder.cnn.{head}.bias"}
    pixels, mask = random_pixels(model, 2), random_mask(model, 2)
    model(pixels, mask)[0].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_encoder_and_decoder(family):
    model = tiny_model(family)
    pixels, mask = random_pixels(model, 4), random_mask(model, 4)
    model(pixels, mask)[0].backward()
    enc = sum(p.grad.abs().sum() for p in model.encoder.parameters())
    dec = sum(p.grad.abs().sum() for p in model.decoder.parameters())
    assert enc > 0 and dec > 0


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_mask_token_gets_a_gradient_only_when_something_is_masked(family):
    model = tiny_model(family)
    pixels = random_pixels(model, 2)
    model(pixels, random_mask(model, 2))[0].backward()
    assert model.encoder.mask_token.grad.abs().sum() > 0
    model.zero_grad()
    h, w = model.encoder.grid
    # nothing masked: the loss is 0 and the token takes no part
    model(pixels, torch.zeros(2, h, w, dtype=torch.uint8))[0].backward()
    assert model.encoder.mask_token.grad is None or model.encoder.mask_token.grad.abs().sum() == 0


# ---- decoders and embeddings ------------------------------------------------------------------


def test_linear_decoder_is_a_1x1_conv_to_stride_squared_channels_and_a_pixel_shuffle():
    dec = create_decoder("linear", embed_dim=32, stride=4, in_chans=3, feature_grid=(8, 8))
    assert isinstance(dec, LinearDecoder)
    assert dec.proj.kernel_size == (1, 1) and dec.proj.out_channels == 4 * 4 * 3
    out = dec(torch.randn(2, 32, 8, 8))
    assert out.shape == (2, 3, 32, 32)
    # PixelShuffle: output pixel (c, y, x) is channel c * s^2 + (y % s) * s + (x % s) of cell
    proj = dec.proj(torch.ones(1, 32, 8, 8))
    assert out.shape and torch.allclose(
        dec(torch.ones(1, 32, 8, 8))[0, 1, 2, 3], proj[0, 1 * 16 + 2 * 4 + 3, 0, 0]
    )


def test_transformer_decoder_maps_the_feature_map_to_pixels():
    dec = create_decoder("transformer", embed_dim=32, stride=4, in_chans=1, feature_grid=(8, 8))
    assert isinstance(dec, TransformerDecoder)
    assert dec(torch.randn(2, 32, 8, 8)).shape == (2, 1, 32, 32)


def test_model_with_the_transformer_decoder_trains():
    model = tiny_model("vit", decoder="transformer")
    loss, _, recon = model(random_pixels(model, 2), random_mask(model, 2))
    loss.backward()
    assert recon.shape == (2, 1, 32, 32)
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_unknown_decoder_raises_value_error():
    with pytest.raises(ValueError, match="conv"):
        create_decoder("conv", 32, 4, 1, (8, 8))


@pytest.mark.parametrize("family", FAMILIES)
def test_embed_is_the_mean_of_the_unmasked_feature_map(family):
    model = tiny_model(family).eval()
    pixels = random_pixels(model, 3)
    with torch.no_grad():
        emb = model.embed(pixels)
        fmap, _ = model.encoder.forward_features(pixels)
    assert emb.shape == (3, model.embed_dim)
    torch.testing.assert_close(emb, fmap.mean(dim=(2, 3)))


def test_vit_mean_pooling_uses_patch_tokens_after_the_final_norm_and_cls_pooling_the_cls_token():
    model = tiny_model("vit").eval()
    cls_model = tiny_model("vit", pooling="cls").eval()
    cls_model.load_state_dict(model.state_dict())
    pixels = random_pixels(model, 2)
    with torch.no_grad():
        tokens = model.encoder.forward_tokens(pixels)  # [N, 1 + L, D] after norm
        mean, cls = model.embed(pixels), cls_model.embed(pixels)
    torch.testing.assert_close(mean, tokens[:, 1:].mean(1))
    torch.testing.assert_close(cls, tokens[:, 0])


def test_embedding_is_deterministic_in_eval_mode():
    model = tiny_model("cnn", encoder_kwargs=dict(patch_size=8, fill="noise")).eval()
    pixels = random_pixels(model, 2)
    with torch.no_grad():
        assert torch.equal(model.embed(pixels), model.embed(pixels))


def test_cls_pooling_is_refused_where_the_encoder_has_no_cls_token():
    with pytest.raises(ValueError, match="cls"):
        tiny_model("swin", pooling="cls")


def test_model_config_round_trips_through_a_plain_dict():
    cfg = tiny_config("swin")
    assert type(cfg)(**cfg.to_dict()) == cfg
