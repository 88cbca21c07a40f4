"""OpenAI image API schemas (pydantic) and their conversion to a GenerationRequest.

Unknown fields are refused (OpenAI answers "Unrecognized request argument"), types are strict
(no "3" for 3), and everything that depends on the loaded model is checked by
`GenerationRequest.resolve` against its limits, before any model work.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ditserve.api import GenerationRequest, InvalidRequest

_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
SIZE_PATTERN = r"^(auto|\d{1,5}x\d{1,5})$"  # the same rule as _SIZE, for the OpenAPI document
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_IGNORED = "accepted for OpenAI compatibility, no effect"


class ImageGenerationBody(BaseModel):
    """`POST /v1/images/generations`: OpenAI's fields plus ditserve's sampling extensions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="What to draw.")
    model: str | None = Field(None, description="The served model's id (see /v1/models); optional.")
    n: int | None = Field(None, ge=1, description="Number of images (default 1).")
    size: str | None = Field(None, pattern=SIZE_PATTERN, examples=["1024x1024"],
                             description='"WIDTHxHEIGHT" in pixels, or "auto" for the model default.')
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json (default) or url: a link to GET /v1/images/{id}/content, valid for a TTL.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Default png.")
    output_compression: int | None = Field(
        None, ge=0, le=100, description="JPEG/WebP quality 0-100 (default 95); PNG is lossless.")
    # OpenAI's fields that some clients send by default: accepted and ignored, unless a value asks for
    # something the served model cannot do (then 400).
    quality: Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"] | None = Field(
        None, description=f"Ignored ({_IGNORED}); quality follows num_inference_steps.")
    style: Literal["vivid", "natural"] | None = Field(None, description=f"Ignored ({_IGNORED}).")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto and opaque are accepted; transparent is refused (400): the image models "
                          "served here draw opaque images — except Qwen-Image-Layered, whose RGBA layers take "
                          "auto or transparent (opaque is a 400).")
    moderation: Literal["auto", "low"] | None = Field(None, description=f"Ignored ({_IGNORED}); ditserve "
                                                                        "does no content moderation.")
    user: str | None = Field(None, description=f"Ignored ({_IGNORED}).")
    safety_identifier: str | None = Field(None, description=f"Ignored ({_IGNORED}).")
    stream: bool | None = Field(None, description="Only false: images are returned whole.")
    partial_images: int | None = Field(None, ge=0, description="Only 0 (streaming is not supported).")
    # ditserve extensions (the openai client sends them with `extra_body`)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed, same image.")
    negative_prompt: str | None = Field(None, description="Used when true_cfg_scale > 1 (SD3, Wan: "
                                                             "guidance_scale > 1).")
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False)
    true_cfg_scale: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_sequence_length: int | None = Field(None, ge=1, description="Most prompt tokens the text encoder sees.")
    sampler: Literal["euler", "unipc", "dpm++"] | None = Field(
        None, description="Solver override; default: the model folder's scheduler.")
    flow_shift: float | None = Field(None, gt=0, allow_inf_nan=False,
                                     description="Flow-matching shift override (static shift).")
    cache: bool | None = Field(None, description="false: compute every step in full even when the server "
                                                 "runs a step cache (--cache); default true.")
    skip_guidance_layers: list[int] | None = Field(
        None, min_length=1, description="SD3 with CFG: skip-layer guidance over these blocks, as diffusers "
                                        "(e.g. [7, 8, 9] for SD3.5-Medium); default off.")
    skip_layer_guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False, description="Default 2.8.")
    skip_layer_guidance_start: float | None = Field(None, ge=0, allow_inf_nan=False,
                                                    description="Fraction of the steps; default 0.01.")
    skip_layer_guidance_stop: float | None = Field(None, ge=0, allow_inf_nan=False,
                                                   description="Fraction of the steps; default 0.2.")
    layers: int | None = Field(None, description="Qwen-Image-Layered (edits): RGBA layers to split the image "
                                                 "into, returned layer after layer for each of the n images; "
                                                 "default 4.")

    def to_request(self, images: tuple = (), transparent: bool = False) -> GenerationRequest:
        """The unresolved request (with decoded input `images` for an edit); resolving validates it.
        `transparent`: the model draws RGBA layers (Qwen-Image-Layered), so `background` may not be opaque."""
        _check_text("prompt", self.prompt)
        _check_text("negative_prompt", self.negative_prompt)
        if self.stream or self.partial_images:
            raise InvalidRequest("streaming (stream, partial_images) is not supported; images are returned whole",
                                 "stream" if self.stream else "partial_images")
        if self.background == "transparent" and not transparent:
            raise InvalidRequest("the loaded model draws opaque images; background 'transparent' is not "
                                 "supported (use 'opaque' or 'auto')", "background")
        if self.background == "opaque" and transparent:
            raise InvalidRequest("the loaded model draws transparent layers; background 'opaque' is not "
                                 "supported (use 'transparent' or 'auto')", "background")
        width, height = parse_size(self.size)
        return GenerationRequest(
            prompt=self.prompt, negative_prompt=self.negative_prompt, height=height, width=width,
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
            true_cfg_scale=self.true_cfg_scale, seed=self.seed, num_images=self.n or 1,
            max_sequence_length=self.max_sequence_length, images=images,
            sampler=self.sampler, flow_shift=self.flow_shift, cache=self.cache is not False,
            skip_guidance_layers=None if self.skip_guidance_layers is None else tuple(self.skip_guidance_layers),
            skip_layer_guidance_scale=self.skip_layer_guidance_scale,
            skip_layer_guidance_start=self.skip_layer_guidance_start,
            skip_layer_guidance_stop=self.skip_layer_guidance_stop, layers=self.layers,
        )


class ImageEditBody(ImageGenerationBody):
    """`POST /v1/images/edits` form fields besides the files (image, image[], mask).

    Form fields arrive as text, so types are converted ("2" → 2); unknown fields are still refused.
    """

    model_config = ConfigDict(extra="forbid", strict=False)

    input_fidelity: Literal["high", "low"] | None = Field(None, description=f"Ignored ({_IGNORED}).")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WIDTHxHEIGHT' → (width, height); None or 'auto' → the model's default."""
    if size is None or size == "auto":
        return None, None
    match = _SIZE.fullmatch(size)
    if match is None:
        raise InvalidRequest(f"size must be 'WIDTHxHEIGHT' (e.g. 1024x1024) or 'auto', got {size!r}", "size")
    return int(match[1]), int(match[2])


def _check_text(name: str, text: str | None) -> None:
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(f"{name} is not valid Unicode text (it has a lone surrogate)", name) from None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class TimingsBody(BaseModel):
    """ditserve's timings for the request, in seconds."""

    queue_s: float = Field(description="waiting in the queue")
    total_s: float = Field(description="the pipeline call (all stages)")
    stages: dict[str, float]
    mean_step_s: float | None = None
    batch_images: int = Field(description="images in the pipeline call that ran this request")
    cache: dict[str, str | int] | None = Field(
        None, description='with a step cache: {"method", "forwards", "skipped"} of the pipeline call')
    peak_memory_gib: dict[str, float] | None = Field(
        None, description="on a GPU: each stage's peak allocated GPU memory, GiB (absent on CPU)")


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: Literal["png", "jpeg", "webp"]
    size: str
    seed: int = Field(description="the seed used (given or drawn)")
    timings: TimingsBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ditserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def edits_openapi() -> dict:
    """The multipart body of /v1/images/edits for the OpenAPI document (the handler reads the form
    itself, so that a model that cannot edit answers before the upload is parsed)."""
    schema = ImageEditBody.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    properties = {"image": binary, "image[]": {"type": "array", "items": binary}, "mask": binary,
                  **schema["properties"]}
    form = {"type": "object", "required": ["prompt"], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


class VideoCreateBody(BaseModel):
    """`POST /v1/videos` fields (JSON, or form fields as text: types are converted, unknown refused)."""

    model_config = ConfigDict(extra="forbid", strict=False)

    prompt: str = Field(max_length=100_000)
    model: str | None = None
    seconds: str | None = Field(None, description="Clip length; with fps it sets the frame count "
                                                  "(num_frames wins). A string, as OpenAI sends it.")
    size: str | None = Field(None, pattern=SIZE_PATTERN, description="WIDTHxHEIGHT (default: the model's)")
    # ditserve extensions
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    negative_prompt: str | None = None
    num_frames: int | None = Field(None, ge=1, description="Frames (4k+1 for Wan); wins over seconds.")
    fps: int | None = Field(None, ge=1)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False)
    guidance_scale_2: float | None = Field(None, ge=0, allow_inf_nan=False)
    sampler: Literal["euler", "unipc", "dpm++"] | None = None
    flow_shift: float | None = Field(None, gt=0, allow_inf_nan=False)
    cache: bool | None = Field(None, description="false: no step caching for this job (default true)")
    use_dynamic_cfg: bool | None = Field(None, description="CogVideoX: guidance that grows over the run "
                                                            "(default: the model's, off)")


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """A video job as OpenAI's Video object, plus ditserve's `seed` and `timings` (for the OpenAPI
    document; the routes build it from the job store)."""

    id: str = Field(description="video_<32 hex>")
    object: Literal["video"] = "video"
    model: str
    status: Literal["queued", "in_progress", "completed", "failed"]
    progress: int = Field(ge=0, le=100, description="percent of the denoising steps run")
    created_at: int
    completed_at: int | None
    expires_at: int = Field(description="when the job and its files are deleted (--output-ttl)")
    size: str
    seconds: str
    prompt: str | None
    error: VideoError | None
    remixed_from_video_id: None = None
    seed: int | None
    timings: dict | None = Field(description="queue, stage and step times once completed")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


def videos_openapi() -> dict:
    """The body of POST /v1/videos for the OpenAPI document: JSON, or the same fields as a form with
    an optional `input_reference` image (the handler reads either itself)."""
    schema = VideoCreateBody.model_json_schema()
    form = {**schema, "properties": {**schema["properties"],
                                     "input_reference": {"type": "string", "format": "binary"}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "multipart/form-data": {"schema": form}}}}
