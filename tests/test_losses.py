"""Losses: the masked reconstruction loss exactly as SimMIM, and the three similarity terms.

Reconstruction (DESIGN §2): sum(err * M) / (sum(M) + 1e-5) / C over normalised pixels, M the
mask upsampled to pixels, err = |x - y| (L1, default) or (x - y)^2 (MSE).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import tiny_model

from simmim_core.nn.losses import (
    cosine_loss,
    info_nce,
    perceptual_loss,
    reconstruction_loss,
    upsample_mask,
)


def test_upsample_mask_repeats_each_token_over_its_patch_of_pixels():
    mask = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.uint8)
    up = upsample_mask(mask, 3)
    assert up.shape == (1, 1, 6, 6)
    assert up[0, 0, :3, :3].all() and up[0, 0, 3:, 3:].all()
    assert not up[0, 0, :3, 3:].any() and not up[0, 0, 3:, :3].any()


def hand_case():
    """2 channels, 4 x 4 pixels, patch 2, the diagonal patches masked (8 pixels per channel).

    On masked pixels channel 0 is off by 1 and channel 1 by 3; visible pixels are off by 100.
    """
    mask = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.uint8)
    pixels = torch.zeros(1, 2, 4, 4)
    m = upsample_mask(mask, 2)[0, 0].bool()
    recon = torch.full((1, 2, 4, 4), 100.0)
    recon[0, 0][m] = 1.0
    recon[0, 1][m] = -3.0
    return pixels, recon, mask


def test_l1_loss_equals_the_formula_on_a_hand_computed_case():
    pixels, recon, mask = hand_case()
    # (8 * |1| + 8 * |-3|) / 8 masked pixels / 2 channels = 2
    expected = (8 * 1 + 8 * 3) / (8 + 1e-5) / 2
    loss = reconstruction_loss(pixels, recon, mask, patch_size=2)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(2.0, rel=1e-5)


def test_mse_loss_equals_the_formula_on_a_hand_computed_case():
    pixels, recon, mask = hand_case()
    # (8 * 1^2 + 8 * 3^2) / 8 / 2 = 5
    loss = reconstruction_loss(pixels, recon, mask, patch_size=2, kind="mse")
    assert loss.item() == pytest.approx((8 * 1 + 8 * 9) / (8 + 1e-5) / 2, rel=1e-6)


def test_loss_is_the_mean_over_masked_pixels_across_the_batch_not_per_image():
    # image 0 has 1 masked patch with error 1, image 1 has 3 masked patches with error 5
    mask = torch.tensor([[[1, 0], [0, 0]], [[1, 1], [1, 0]]], dtype=torch.uint8)
    pixels = torch.zeros(2, 1, 4, 4)
    recon = torch.stack([torch.full((1, 4, 4), 1.0), torch.full((1, 4, 4), 5.0)])
    loss = reconstruction_loss(pixels, recon, mask, patch_size=2)
    assert loss.item() == pytest.approx((4 * 1 + 12 * 5) / 16, rel=1e-5)


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_loss_is_zero_on_a_perfect_reconstruction(kind):
    pixels = torch.randn(3, 3, 8, 8)
    mask = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (3, 4, 4)).astype(np.uint8))
    assert reconstruction_loss(pixels, pixels.clone(), mask, 2, kind).item() == 0.0


@pytest.mark.parametrize("kind", ["l1", "mse"])
def test_only_masked_pixels_count(kind):
    pixels = torch.randn(2, 1, 8, 8)
    mask = torch.zeros(2, 2, 2, dtype=torch.uint8)
    mask[:, 0, 1] = 1
    m = upsample_mask(mask, 4).bool()
    recon = torch.randn(2, 1, 8, 8)
    base = reconstruction_loss(pixels, recon, mask, 4, kind)
    visible_changed = torch.where(m, recon, recon + 10.0)
    masked_changed = torch.where(m, recon + 10.0, recon)
    assert reconstruction_loss(pixels, visible_changed, mask, 4, kind).item() == base.item()
    assert reconstruction_loss(pixels, masked_changed, mask, 4, kind).item() != base.item()


def test_loss_gradient_reaches_only_masked_pixels():
    pixels = torch.randn(1, 1, 4, 4)
    recon = torch.randn(1, 1, 4, 4, requires_grad=True)
    mask = torch.tensor([[[0, 1], [0, 0]]], dtype=torch.uint8)
    reconstruction_loss(pixels, recon, mask, 2).backward()
    m = upsample_mask(mask, 2).bool()
    assert (recon.grad[~m] == 0).all()
    assert (recon.grad[m] != 0).all()


def test_an_empty_mask_gives_zero_loss_not_nan():
    pixels, recon = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)
    assert reconstruction_loss(pixels, recon, torch.zeros(1, 2, 2, dtype=torch.uint8), 2) == 0


def test_unknown_reconstruction_loss_raises_value_error():
    with pytest.raises(ValueError, match="huber"):
        reconstruction_loss(
            torch.zeros(1, 1, 2, 2),
            torch.zeros(1, 1, 2, 2),
            torch.ones(1, 1, 1, dtype=torch.uint8),
            2,
            kind="huber",
        )


# ---- similarity terms -------------------------------------------------------------------------


def test_cosine_loss_is_zero_for_identical_inputs():
    a = torch.randn(8, 16)
    assert cosine_loss(a, a.clone()).item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_loss_is_one_for_orthogonal_and_two_for_opposite_inputs():
    a = torch.eye(4)
    assert cosine_loss(a, a.roll(1, dims=1)).item() == pytest.approx(1.0, abs=1e-6)
    assert cosine_loss(a, -a).item() == pytest.approx(2.0, abs=1e-6)


def test_cosine_loss_ignores_the_scale_of_the_features():
    a = torch.randn(8, 16)
    assert cosine_loss(a, 5.0 * a).item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_loss_treats_its_second_argument_as_a_fixed_target():
    a = torch.randn(4, 8, requires_grad=True)
    b = torch.randn(4, 8, requires_grad=True)
    cosine_loss(a, b).backward()
    assert a.grad is not None and b.grad is None


def test_info_nce_is_lower_for_matched_than_for_shuffled_pairs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 32, generator=g)
    b = a + 0.1 * torch.randn(16, 32, generator=g)  # row i of b is a view of row i of a
    shuffled = b[torch.randperm(16, generator=g)]
    assert info_nce(a, b, 0.2) < info_nce(a, shuffled, 0.2)


def test_info_nce_of_perfectly_matched_orthogonal_pairs_approaches_zero_at_low_temperature():
    a = torch.eye(8)
    assert info_nce(a, a, temperature=0.01).item() == pytest.approx(0.0, abs=1e-6)
    # at a high temperature every candidate looks alike: the loss tends to log(N)
    assert info_nce(a, a, temperature=1e4).item() == pytest.approx(np.log(8), rel=1e-3)


def test_info_nce_is_symmetric_in_its_two_views():
    a, b = torch.randn(6, 10), torch.randn(6, 10)
    assert info_nce(a, b, 0.2).item() == pytest.approx(info_nce(b, a, 0.2).item(), rel=1e-6)


def test_perceptual_loss_is_zero_for_identical_feature_maps():
    a = torch.randn(2, 8, 4, 4)
    assert perceptual_loss(a, a.clone()).item() == 0.0


def test_perceptual_loss_is_the_mean_absolute_feature_difference():
    a = torch.zeros(2, 8, 4, 4)
    assert perceptual_loss(a, a + 0.5).item() == pytest.approx(0.5)


# ---- the similarity terms inside SimMIM -----------------------------------------------------


@pytest.mark.parametrize("sim_loss", ["cosine", "perceptual"])
def test_similarity_term_is_zero_when_nothing_is_masked(sim_loss):
    # nothing masked: the composite (visible pixels + reconstruction) is the original itself
    model = tiny_model("vit", sim_loss=sim_loss).eval()
    pixels = torch.randn(4, 1, 32, 32)
    _, parts, _ = model(pixels, torch.zeros(4, 8, 8, dtype=torch.uint8))
    assert parts["sim"].item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("sim_loss", ["none", "cosine", "perceptual", "contrastive"])
def test_the_total_loss_is_reconstruction_plus_lambda_times_similarity(sim_loss):
    model = tiny_model("vit", sim_loss=sim_loss, sim_lambda=0.3)
    pixels = torch.randn(4, 1, 32, 32)
    mask = torch.from_numpy(np.random.default_rng(0).integers(0, 2, (4, 8, 8)).astype(np.uint8))
    loss, parts, recon = model(pixels, mask)
    assert set(parts) == {"loss", "rec", "sim"}
    assert recon.shape == pixels.shape
    assert loss.item() == pytest.approx(parts["rec"].item() + 0.3 * parts["sim"].item(), rel=1e-6)
    assert parts["rec"].item() == pytest.approx(
        reconstruction_loss(pixels, recon, mask, model.patch_size).item(), rel=1e-6
    )
    if sim_loss == "none":
        assert parts["sim"].item() == 0.0
    else:
        assert parts["sim"].item() > 0.0


def test_perceptual_ema_encoder_is_frozen_and_gets_no_gradient():
    model = tiny_model("vit", sim_loss="perceptual")
    assert all(not p.requires_grad for p in model.ema_encoder.parameters())
    pixels = torch.randn(4, 1, 32, 32)
    mask = torch.ones(4, 8, 8, dtype=torch.uint8)
    loss, _, _ = model(pixels, mask)
    loss.backward()
    assert all(p.grad is None for p in model.ema_encoder.parameters())
    # the perceptual term still trains the encoder and decoder through the reconstruction
    assert model.decoder.proj.weight.grad.abs().sum() > 0


def test_update_ema_moves_the_ema_encoder_toward_the_encoder_by_its_momentum():
    model = tiny_model("vit", sim_loss="perceptual", ema_momentum=0.9)
    ema_before = {k: v.clone() for k, v in model.ema_encoder.state_dict().items()}
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model.update_ema()
    ema, enc = model.ema_encoder.state_dict(), model.encoder.state_dict()
    for name, before in ema_before.items():
        torch.testing.assert_close(ema[name], 0.9 * before + 0.1 * enc[name])


def test_update_ema_does_nothing_without_the_perceptual_term():
    model = tiny_model("vit", sim_loss="cosine")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.update_ema()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.ema_encoder is None


def test_contrastive_term_trains_its_projection_head():
    model = tiny_model("vit", sim_loss="contrastive")
    pixels = torch.randn(4, 1, 32, 32)
    mask = torch.ones(4, 8, 8, dtype=torch.uint8)
    loss, _, _ = model(pixels, mask, target_pixels=pixels.flip(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.proj.parameters())


def test_unknown_similarity_loss_raises_value_error():
    with pytest.raises(ValueError, match="triplet"):
        tiny_model("vit", sim_loss="triplet")
