"""What the API answers, as OpenAPI shows it: the original service's fields (`success`, `output_path`,
`message`; errors `success: false`, `detail`) beside bgwatch's own, the multipart forms from the JobSpec
schema, `/download` as an image, and every error code with what it means."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from bgwatch.httpforms import FORMS

SUCCESS_MESSAGES = {"cleanup": "Background cleanup completed successfully",
                    "replace": "Background replacement completed successfully"}


class Processed(BaseModel):
    """200: the image is processed."""

    success: bool = Field(True, description="the original service's: true")
    output_path: str = Field(description="the result file on the server (under OUTPUT_DIR when it is set), as "
                             "the original service answered; clients elsewhere fetch download_url")
    message: str = Field(description="the original service's one-line summary")
    status: str = Field("success", description="bgwatch's: success")
    run_id: int = Field(description="the run in bgwatch's history (GET /runs/{run_id})")
    filename: str = Field(description="the result's name")
    download_url: str = Field(description="GET it for the image (kept http.keep_hours)")
    timings: dict[str, float] = Field(description="seconds spent in each stage")
    seed: int | None = Field(None, description="the generation seed (generative engines)")
    mask_engine: str | None = Field(None, description="what cut the subject out")
    bg_engine: str | None = Field(None, description="what made the background (a fallback engine when the "
                                  "generation failed and fallback_engine is set)")


class Queued(BaseModel):
    """202 (?wait=false): recorded and queued."""

    success: bool = True
    message: str
    status: str = "queued"
    run_id: int
    status_url: str = Field(description="poll it: GET /runs/{run_id}")


class Failure(BaseModel):
    """Any error: the original service's `detail`, one line that names the field and what is allowed."""

    success: bool = False
    detail: str
    run_id: int | None = Field(None, description="the run, when the job was recorded and failed")
    status: str | None = Field(None, description="the run's status (failed), when there is a run")


class Health(BaseModel):
    """GET /health: the original service's three fields, then bgwatch's."""

    status: str = Field(description="healthy, or stopping")
    engine: str = Field(description="the default background engine, as the original named it (SDXL, RUNWAY...)")
    device: str = Field(description="the device in use: cuda or cpu (auto resolved)")
    version: str
    configured_device: str = Field(description="config.yaml's device (auto, cuda, cpu)")
    gpu: str | None = None
    engines_loaded: list[str]
    queue_depth: int = Field(description="jobs waiting in front of the pipeline's stages")
    http_in_flight: int = Field(description="HTTP jobs in the pipeline (at most http.window)")
    http_waiting: int = Field(description="HTTP requests waiting for the window (at most http.queue)")
    http_window: int
    http_queue: int
    rate_limit: str = Field(description="what the rate limit counts: requests or generations (http.limit)")
    connections: dict[str, int] = Field(description="open connections, their limit, and how many were closed "
                                        "to make room (evicted, refused) or for sending no headers in time")


class RunRecord(BaseModel):
    """GET /runs/{run_id}: an HTTP run."""

    success: bool = Field(description="false once the run failed (queued, running and done: true)")
    detail: str | None = Field(None, description="a failed run's reason, as the original's errors carry it")
    run_id: int
    status: str = Field(description="queued, running, done or failed")
    filename: str
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: dict[str, float]
    seed: int | None
    mask_engine: str | None
    bg_engine: str | None
    download_url: str | None = None
    output_path: str | None = None


class ServiceInfo(BaseModel):
    """GET /: what this is, as the original service's root answered."""

    service: str
    version: str
    status: str
    endpoints: list[str]
    docs: str


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "model": Failure}


SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"description": "?wait=false: recorded and queued; poll /runs/{run_id}", "model": Queued},
    400: _error("the multipart body is malformed (a boundary over 70 characters, a broken part)"),
    401: _error("a valid API key is required (Authorization: Bearer <key>)"),
    408: _error("the upload stalled (http.body_timeout) or took longer than http.upload_timeout"),
    413: _error("the upload (http.max_upload_bytes, or the form over 256 KB), or the image (limits.max_pixels, "
                "the 4K rule), is too large"),
    422: _error("a bad parameter, or not an image: the message a folder job's .error.txt carries"),
    429: _error("the rate limit has no slot within http.max_wait (see Retry-After)"),
    500: _error("the job failed while processing; detail says why (as in bgwatch's run history)"),
    503: _error("the HTTP queue is full (http.window + http.queue), or bgwatch is stopping (see Retry-After)"),
}
IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
DOWNLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the image", "content": {media: {"schema": {"type": "string", "format": "binary"}}
                                                  for media in IMAGE_TYPES}},
    401: _error("a valid API key is required"),
    404: _error("no result by that name (results are kept http.keep_hours)"),
}
KEYED_RESPONSES: dict[int | str, dict[str, Any]] = {401: _error("a valid API key is required")}

_KINDS: dict[str, dict[str, Any]] = {
    "flag": {"type": "boolean"}, "int": {"type": "integer"}, "float": {"type": "number"},
    "seed": {"type": "integer", "nullable": True}, "colour": {"type": "string", "example": "#ffffff"},
    "colours": {"type": "string", "example": "#f4f4f4,#c8c8c8", "description": "two colours, comma-separated"},
}


def form_schema(operation: str) -> dict[str, Any]:
    """The multipart body in OpenAPI, from the JobSpec schema (the handlers read the stream themselves)."""
    properties: dict[str, Any] = {"file": {"type": "string", "format": "binary",
                                           "description": "the image: JPEG, PNG, WebP or TIFF"}}
    for form_field in FORMS[operation]:
        spec_field = form_field.spec_field
        schema: dict[str, Any] = {"type": "string", **_KINDS.get(spec_field.kind, {})}
        schema["description"] = spec_field.help + (f"; {schema['description']}" if "description" in schema else "")
        if spec_field.choices:
            schema["enum"] = list(spec_field.choices)
        if spec_field.minimum is not None:
            schema["minimum"], schema["maximum"] = spec_field.minimum, spec_field.maximum
        default = form_field.default if form_field.default is not None else spec_field.default
        if default not in (None, ""):
            schema["default"] = ",".join(default) if isinstance(default, list) else default
        properties[form_field.name] = schema
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file"], "properties": properties}}}}}
