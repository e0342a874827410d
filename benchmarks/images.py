"""Request images: real photographs found on the machine, and tiny images cut from them.

No downloads: the photographs come from Debian's lomiri-wallpapers-16.04 and -20.04 packages
(photographs from the Ubuntu wallpaper contests, 1-6k px, `apt-get install` them) and
matplotlib's sample grace_hopper.jpg; --photos names other files. Only if none is found are
synthetic JPEGs used, and the result says so.
"""

from __future__ import annotations

import base64
import glob
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

# The photographs among /usr/share/backgrounds (the other wallpapers there are drawings).
DEBIAN_PHOTOS = [
    "Bridge_by_Sander_Klootwijk",
    "Dragonfly_by_Bolly",
    "Kleiber_by_Lukas_Baubkus",
    "Picture_0B_by_freespace",
    "Picture_1A_by_freespace",
    "Wine_by_Jakkub_Mede",
    "aitzgorri_by_Aitzol_Berasategi",
    "free_by_Peter_Nerlich",
    "friends_by_Aitzol_Berasategi",
    "greentock_by_Peter_Nerlich",
    "life_by_Aitzol_Berasategi",
    "picosdeeuropa_by_Aitzol_Berasategi",
    "seeding_by_Clements_Engelhardt",
    "sunset_by_Aitzol_Berasategi",
]


def find_photos(patterns: list[str] | None = None) -> tuple[list[Path], str]:
    """(JPEG photographs, where they came from)."""
    if patterns:
        files = sorted({Path(f) for p in patterns for f in glob.glob(os.path.expanduser(p))})
        return files, "given by --photos"
    files = [Path(f"/usr/share/backgrounds/{name}.jpg") for name in DEBIAN_PHOTOS]
    files = [f for f in files if f.is_file()]
    source = "Debian lomiri-wallpapers-16.04/-20.04 photographs" if files else ""
    try:
        import matplotlib

        hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if hopper.is_file():
            files.append(hopper)
            source += (" + " if source else "") + "matplotlib's grace_hopper.jpg"
    except ImportError:
        pass
    return files, source


def synthetic_jpegs(n: int, side: int = 1024) -> list[bytes]:
    """Smooth random color fields as JPEGs: a stand-in only when no photograph exists."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side * 2 // 3), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def shrink_jpeg(data: bytes, long_side: int) -> bytes:
    """A photograph re-encoded with its longer side at most long_side (baseline JPEG, q 90)."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (long_side, long_side))
    img = img.convert("RGB")
    img.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def tiny_images(photos: list[bytes], side: int, mode: str, n: int) -> list[bytes]:
    """n PNGs of side x side in `mode`, center crops of the photographs (small images)."""
    out = []
    for i in range(n):
        img = Image.open(io.BytesIO(photos[i % len(photos)]))
        img.draft("RGB", (side * 4, side * 4))
        img = img.convert(mode)
        w, h = img.size
        s = min(w, h) // (1 + i // len(photos))  # later rounds zoom in: distinct images
        box = ((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)
        img = img.resize((side, side), Image.Resampling.LANCZOS, box=box)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def write_bodies(images: list[bytes], path: Path, per_request: int = 1) -> Path:
    """JSON lines for the load generator: POST /embed bodies with `per_request` images each,
    asking for base64 embeddings, as the project's client (simmim_client) does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(0, len(images) - per_request + 1, per_request):
            chunk = [base64.b64encode(b).decode() for b in images[i : i + per_request]]
            body = {"images": chunk, "encoding": "base64"}
            f.write(json.dumps({"images": len(chunk), "body": body}) + "\n")
    return path
