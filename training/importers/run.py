"""Import a source into a run folder: detect its format, read it, write checkpoint.pt (the plain
dict `simmim pretrain` writes) and config.json, atomically (a failure leaves no folder)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from simmim_core.preprocess import Preprocessing

from ..checkpoint import checkpoint_dict, save_atomic
from ..presets import TrainConfig
from .hf import read_hf
from .official import is_official, read_official
from .source import Imported, ImportOptions, SourceError, load_weights_file, read_json
from .timm_format import read_timm

IMPORTERS = {"official": read_official, "hf": read_hf, "timm": read_timm}


def detect_format(source: Path) -> tuple[str, dict | None]:
    """(format, the loaded file or None): a folder by its config.json (Hugging Face:
    model_type; timm: architecture), a file by its keys (official: encoder.* + decoder.*)."""
    if source.is_dir():
        config_path = source / "config.json"
        if not config_path.is_file():
            raise SourceError(f"{source} has no config.json (not a Hugging Face or timm folder)")
        config = read_json(config_path)
        if "architecture" in config:
            return "timm", None
        if "model_type" in config:
            return "hf", None
        raise SourceError(
            f"{config_path}: no field model_type (Hugging Face) or architecture (timm)"
        )
    if not source.is_file():
        raise SourceError(f"{source} not found")
    obj = load_weights_file(source)
    state = obj.get("model") if isinstance(obj.get("model"), dict) else obj
    if is_official(state):
        return "official", obj
    if any(k.startswith(("vit.", "swin.")) for k in state):
        raise SourceError(
            f"{source} holds Hugging Face weights: pass the folder with its config.json"
        )
    if "patch_embed.proj.weight" in (obj.get("state_dict") or state):
        return "timm", obj
    raise SourceError(
        f"{source}: key {next(iter(state))!r} fits none of the formats "
        "(official SimMIM: encoder.*/decoder.*, timm: patch_embed.*, Hugging Face: a folder)"
    )


def import_run(
    source,
    out,
    fmt: str | None = None,
    options: ImportOptions | None = None,
    domain: str | None = None,
    command: str | None = None,
) -> tuple[Path, Imported]:
    """Read `source` (format `fmt`, or detected) and write the run folder `out`."""
    source, out = Path(source), Path(out)
    if out.exists():
        raise SourceError(f"output folder {out} already exists; choose a new --out")
    if fmt is None:
        fmt, obj = detect_format(source)
    else:
        if fmt not in IMPORTERS:
            raise SourceError(f"unknown format {fmt!r}; choose one of {', '.join(IMPORTERS)}")
        if not source.exists():
            raise SourceError(f"{source} not found")
        obj = None
    options = options or ImportOptions()
    imported = IMPORTERS[fmt](source, obj, options)
    size = imported.model.cfg.image_size
    if options.image_size and size != options.image_size:  # timm's sets it; others must agree
        raise SourceError(
            f"{source} is for {size} px images, not --image-size {options.image_size}"
        )
    imported.source["path"] = str(source.resolve())
    if domain:
        imported.domain = domain
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_run(imported, tmp, command)
        tmp.chmod(0o755)  # mkdtemp made it private
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, imported


def write_run(imported: Imported, folder: Path, command: str | None) -> None:
    """checkpoint.pt (loadable by inference_model, like a pretrained run's) and config.json."""
    model, spec = imported.model, imported.preprocessing
    train_cfg = train_config(spec)
    ckpt = checkpoint_dict(model, None, 0, 0, train_cfg, spec, None)
    ckpt["imported"] = {**imported.source, "fresh": imported.fresh}
    ckpt["domain"] = imported.domain
    save_atomic(ckpt, folder / "checkpoint.pt")
    config = {
        "command": command,
        "imported": ckpt["imported"],
        "domain": imported.domain,
        "model": model.cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "preprocessing": spec.to_dict(),
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def train_config(spec: Preprocessing) -> TrainConfig:
    """The recipe recorded with an imported run: defaults, with the source's normalisation."""
    return TrainConfig(mean=spec.mean, std=spec.std, interpolation=spec.interpolation)
