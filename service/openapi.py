"""What /docs shows beyond FastAPI's defaults: the error responses, and request bodies that are
JSON (images in base64) or multipart (images as files)."""

from __future__ import annotations

from pydantic import BaseModel

from .errors import ERRORS
from .schemas import ErrorResponse, RequestBody


def error_docs(*exceptions, model: type[BaseModel] = ErrorResponse) -> dict:
    """OpenAPI `responses` for the given ServiceError types (by status), in `model`'s shape."""
    return {ERRORS[e][0]: {"model": model} for e in exceptions}


def json_body_docs(model: type[BaseModel]) -> dict:
    """OpenAPI requestBody: the model as JSON (its nested models written in place)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        return [inline(v) for v in node] if isinstance(node, list) else node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}


def request_body_docs(model: type[RequestBody]) -> dict:
    """OpenAPI requestBody: the model as JSON (images in base64) or multipart (images as files),
    each image field's own constraints (minItems, nullable, description) kept."""
    schema = model.model_json_schema()

    def as_image(prop: dict, image: dict) -> dict:
        """An image field's schema with `image` for each image: in lists, and in the
        non-null branch of an optional field."""
        if prop.get("type") == "array":
            return {**prop, "items": image}
        if any(branch.get("type") == "array" for branch in prop.get("anyOf", [])):
            return {**prop, "anyOf": [as_image(b, image) for b in prop["anyOf"]]}
        if "anyOf" in prop:  # one image: str | bytes
            return {**{k: v for k, v in prop.items() if k != "anyOf"}, **image}
        return prop

    def with_images(image: dict) -> dict:
        properties = dict(schema["properties"])
        for name in model.files:
            properties[name] = as_image(properties[name], image)
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
