"""What /docs shows beyond FastAPI's defaults: the error responses, and request bodies that are
JSON (images in base64) or multipart (images as files)."""

from __future__ import annotations

from .errors import ERRORS
from .schemas import ErrorResponse, RequestBody


def error_docs(*exceptions) -> dict:
    """OpenAPI `responses` for the given ServiceError types (by status)."""
    return {ERRORS[e][0]: {"model": ErrorResponse} for e in exceptions}


def request_body_docs(model: type[RequestBody]) -> dict:
    """OpenAPI requestBody: the model as JSON (images in base64) or multipart (images as files)."""
    schema = model.model_json_schema()

    def with_images(image: dict) -> dict:
        properties = dict(schema["properties"])
        for name in model.files:
            properties[name] = {"type": "array", "items": image} if name in model.lists else image
        return {**schema, "properties": properties}

    base64_image = {
        "type": "string",
        "description": "the image file in base64 (a data: URI "
        "prefix is accepted; URLs are not fetched)",
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": with_images(base64_image)},
                "multipart/form-data": {
                    "schema": with_images({"type": "string", "format": "binary"})
                },
            },
        }
    }
