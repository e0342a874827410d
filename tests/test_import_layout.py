"""The presets are the paper's architectures: official SimMIM checkpoints (their key names and
shapes, tests/reference.py) fit vit-base-224 and swin-base-192 exactly. Shapes only, on the meta
device: no memory, no arithmetic."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from reference import meta_state, official_swin_shapes, official_vit_shapes

from simmim_core.nn.model import SimMIM
from training.importers.official import read_official
from training.importers.source import ImportOptions
from training.presets import PRESETS

BUFFERS = ("relative_position_index", "attn_mask")


def preset_state(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return SimMIM(PRESETS[name].model).state_dict()


def import_shapes(shapes: dict) -> SimMIM:
    with torch.device("meta"):
        return read_official(
            Path("official.pth"), {"model": meta_state(shapes)}, ImportOptions()
        ).model


def without_training_options(cfg):
    """The architecture alone: drop path only acts while training."""
    kwargs = {k: v for k, v in cfg.encoder_kwargs.items() if k != "drop_path_rate"}
    return replace(cfg, encoder_kwargs=kwargs)


def test_vit_base_224_has_the_official_simmim_vit_key_names_and_shapes():
    ours = {
        k.replace("encoder.vit.", "encoder.").replace("decoder.proj.", "decoder.0."): tuple(v.shape)
        for k, v in preset_state("vit-base-224").items()
    }
    official = {k: s for k, s in official_vit_shapes().items() if not k.endswith(BUFFERS)}
    assert ours == official


def test_an_official_vit_b_checkpoint_imports_as_the_vit_base_224_preset():
    model = import_shapes(official_vit_shapes())
    assert model.cfg == without_training_options(PRESETS["vit-base-224"].model)


def test_an_official_swin_b_checkpoint_imports_as_the_swin_base_192_preset():
    model = import_shapes(official_swin_shapes())
    assert model.cfg == without_training_options(PRESETS["swin-base-192"].model)
