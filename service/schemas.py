"""Request and response bodies (DESIGN §4). Requests come as JSON or as multipart/form-data;
`files` names the fields that carry images, `lists` those that repeat, `queue` the batcher that
runs them (embed or reconstruct: admission checks its room before the body is read)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from simmim_core.model_dir import ModelDir

ImageInput = Annotated[
    str | bytes,
    Field(
        description="JSON: the image file's bytes in base64 (a data: URI prefix is accepted); "
        "multipart: the file itself. URLs are not fetched."
    ),
]


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    files: ClassVar[tuple[str, ...]] = ()  # fields that hold images
    lists: ClassVar[tuple[str, ...]] = ()  # fields that are lists (repeated in multipart)
    queue: ClassVar[str] = "embed"  # the batcher its images go to

    def image_lists(self) -> dict[str, list]:
        """Each image field that was given -> its images (a single image as a list of one)."""
        values = {name: getattr(self, name) for name in self.files}
        return {
            name: value if name in self.lists else [value]
            for name, value in values.items()
            if value is not None
        }

    @property
    def image_count(self) -> int:
        return sum(len(images) for images in self.image_lists().values())

    def check(self, model: ModelDir) -> None:
        """Refuse, once parsed, what the served model cannot do (a ServiceError); by default
        nothing."""


class EmbedRequest(RequestBody):
    files = lists = ("images",)
    images: list[ImageInput] = Field(min_length=1)
    normalize: bool = Field(True, description="L2-normalise each embedding")
    encoding: Literal["float", "base64"] = Field(
        "float",
        description="float: lists of numbers; base64: each embedding as base64 of "
        "float32 little-endian bytes",
    )


class EmbedResponse(BaseModel):
    model: str
    dim: int
    embeddings: list[list[float]] | list[str]


class SimilarityRequest(RequestBody):
    files = lists = ("a", "b")
    a: list[ImageInput] = Field(min_length=1)
    b: list[ImageInput] | None = Field(
        None, min_length=1, description="omitted: a is compared with itself"
    )


class SimilarityResponse(BaseModel):
    scores: list[list[float]] = Field(description="[len(a)][len(b)] cosine similarities")


class ReconstructRequest(RequestBody):
    files = ("image",)
    queue = "reconstruct"
    image: ImageInput
    mask_ratio: float | None = Field(
        None,
        gt=0,
        le=1,
        description="share of mask patches hidden; default: the model's own mask_ratio",
    )
    seed: int | None = Field(
        None, ge=0, description="seed of the random mask; omitted: a fresh mask each call"
    )
    paste_visible: bool = Field(
        True,
        description="true: the reconstruction shows the input's own pixels where the model saw "
        "them and the model's output where they were masked, as the training grid does; "
        "false: the raw decoder output everywhere (untrained on the visible patches)",
    )


class ReconstructResponse(BaseModel):
    mask: list[list[int]] = Field(description="[h][w] at the encoder's patch grid, 1 = masked")
    original: str = Field(description="PNG, base64: the preprocessed image, as the model sees it")
    masked_input: str = Field(
        description="PNG, base64: the preprocessed image with the masked "
        "patches set to the dataset mean"
    )
    reconstruction: str = Field(
        description="PNG, base64: the model's reconstruction, with the visible patches pasted "
        "back unless paste_visible is false"
    )
    loss: float = Field(description="mean L1 over masked pixels, in normalised pixel space")


class ErrorDetail(BaseModel):
    code: str
    message: str
    index: int | None = Field(None, description="which image of the list, when one is at fault")


class ErrorResponse(BaseModel):
    error: ErrorDetail
