"""OpenAI's embeddings API, for images (DESIGN §4): the bodies of POST /v1/embeddings and
GET /v1/models, and what the served model can answer. The routes are in app.py and take the
same request path as /embed.

An input item is an image in base64 (a data: URI prefix accepted), or OpenAI's image part
{"type": "image_url", "image_url": {"url": "data:..."}}; URLs are never fetched (400).
`dimensions` other than the model's own is served only by a model exported with a projection
(`simmim export --project pca:D|pca-whiten:D`): its axes are principal axes in order of
variance, so the first d of them, renormalised, are what a projection fitted to d dimensions
gives (OpenAI's text-embedding-3 shortens its vectors the same way).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from simmim_core.model_dir import ModelDir

from .errors import ModelNotFound, UnsupportedDimensions
from .schemas import ImageInput, RequestBody

OWNED_BY = "simmim-service"


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(description="a data: URI (data:image/png;base64,...); URLs are not fetched")
    detail: str | None = Field(None, description="accepted for compatibility; not used")


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["image_url"]
    image_url: ImageURL


InputItem = ImageInput | ImagePart
INPUT_FORMS = (
    "an image in base64 (a data: URI prefix accepted), "
    '{"type": "image_url", "image_url": {"url": "data:..."}}, or a non-empty list of them'
)


class EmbeddingsRequest(RequestBody):
    files = lists = ("input",)  # multipart: `input` files, as /embed's `images`
    model: str = Field(description="the served model's id, as GET /v1/models lists it")
    input: InputItem | Annotated[list[InputItem], Field(min_length=1)] = Field(
        description=f"the images to embed: {INPUT_FORMS}"
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float",
        description="float: lists of numbers; base64: each embedding as base64 of float32 "
        "little-endian bytes",
    )
    dimensions: int | None = Field(
        None,
        ge=1,
        description="length of the embeddings: the model's own (default), or fewer from a "
        "model exported with a PCA projection",
    )
    user: str | None = Field(None, description="accepted for compatibility; not used")

    @field_validator("input", mode="wrap")
    @classmethod
    def one_message_for_input(cls, value, handler):
        """One clear 422 message instead of one per member of the union."""
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(f"expected {INPUT_FORMS}") from None

    def image_lists(self) -> dict[str, list]:
        items = self.input if isinstance(self.input, list) else [self.input]
        return {"input": [x.image_url.url if isinstance(x, ImagePart) else x for x in items]}

    def check(self, model: ModelDir) -> None:
        """404 for another model's id; 400 for dimensions the model cannot give."""
        check_model_id(self.model, model)
        own, d = model.card["embedding_dim"], self.dimensions
        if d is None or d == own:
            return
        if not model.card.get("projection"):
            raise UnsupportedDimensions(
                f"dimensions {d}: {model.name!r} gives {own} dimensions only (a model "
                "exported with a PCA projection can give fewer)",
                param="dimensions",
            )
        if d > own:
            raise UnsupportedDimensions(
                f"dimensions {d}: {model.name!r} gives 1 to {own} dimensions", param="dimensions"
            )


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int = Field(description="the input item's index")
    embedding: list[float] | str = Field(description="L2-normalised; base64: float32 LE bytes")


class Usage(BaseModel):
    prompt_tokens: int = Field(description="the number of images")
    total_tokens: int = Field(description="the number of images")


class EmbeddingsResponse(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: Usage


class ModelObject(BaseModel):
    id: str = Field(description="the model's name (model.json)")
    object: Literal["model"]
    created: int = Field(description="when it was exported, Unix seconds")
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(
        description="invalid_request_error, authentication_error, rate_limit_error or server_error"
    )
    param: str | None = Field(description="the request field at fault (e.g. input[2])")
    code: str = Field(description="the service's error code (docs/service.md)")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorDetail


def check_model_id(model_id: str, served: ModelDir) -> None:
    """ModelNotFound (404, as OpenAI answers) unless model_id is the served model's name."""
    if model_id != served.name:
        raise ModelNotFound(
            f"the model {model_id!r} does not exist; this server serves {served.name!r} "
            "(GET /v1/models)",
            param="model",
        )


def model_object(model: ModelDir) -> dict:
    """The served model as OpenAI's model object."""
    created = model.card.get("created")
    return {
        "id": model.name,
        "object": "model",
        "created": int(datetime.fromisoformat(created).timestamp()) if created else 0,
        "owned_by": OWNED_BY,
    }


def embedding_list(rows: list, model_name: str) -> dict:
    """The /v1/embeddings answer for `rows` (each a float32 [D] array or its base64 text)."""
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    usage = {"prompt_tokens": len(rows), "total_tokens": len(rows)}
    return {"object": "list", "data": data, "model": model_name, "usage": usage}
