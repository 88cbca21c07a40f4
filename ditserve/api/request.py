"""GenerationRequest: one frozen, validated description of what to generate."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from ditserve.api.errors import InvalidRequest

# what `--sampler` may name: flow-match Euler, UniPC multistep, DPM-Solver++ multistep
SAMPLERS = ("euler", "unipc", "dpm++")


@dataclass(frozen=True)
class RequestDefaults:
    """A family's defaults, as its diffusers pipeline has them."""

    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    true_cfg_scale: float = 1.0
    max_sequence_length: int = 512
    # Edit models: a request with input images but no size takes the (last) image's aspect ratio
    # at about this many pixels (sides rounded to multiples of 32, as diffusers); 0 = not used.
    image_size_area: int = 0
    # video models (0 for image models): frames per video and the frame rate it is shown at
    num_frames: int = 0
    fps: int = 0
    # layered models (Qwen-Image-Layered): RGBA layers per image; 0 for every other model
    layers: int = 0
    # CogVideoX: guidance that grows over the run (diffusers' `use_dynamic_cfg`)
    use_dynamic_cfg: bool = False


@dataclass(frozen=True)
class ModelLimits:
    """What a loaded model accepts; requests are checked against it before any model work."""

    size_multiple: int = 16
    min_size: int = 16
    max_size: int = 4096
    max_pixels: int = 4096 * 4096
    min_steps: int = 1  # 2 where the scheduler ends at a terminal sigma (1 step would be 0/0)
    max_steps: int = 1000
    max_num_images: int = 16
    max_sequence_length: int = 512
    max_prompt_chars: int = 10_000
    # input images (editing): how many a request must / may carry, and how big each may be
    min_images: int = 0
    max_images: int = 0
    max_input_pixels: int = 4096 * 4096
    max_input_aspect: float = 16.0
    samplers: tuple[str, ...] = SAMPLERS  # per-request `sampler` overrides this model accepts
    # video: num_frames must be frame_multiple * k + 1 (Wan: 4k + 1); 0 = an image model
    frame_multiple: int = 0
    max_frames: int = 0
    max_fps: int = 120
    # skip-layer guidance (SD3): how many blocks its layers may index; 0 = the model offers none
    guidance_layers: int = 0
    # layered models: at most this many RGBA layers per image; 0 = not a layered model
    max_layers: int = 0
    # the model writes its own prompt from the input image when the prompt is "" or " " (Qwen-Image-Layered)
    captions: bool = False
    # what a family checks beyond the fields above, from the folder's configs (no weights): raises
    # InvalidRequest; a module-level function or partial, so the limits still pickle
    refuse: Callable[["GenerationRequest"], None] | None = None
    # the model offers dynamic CFG (CogVideoX)
    dynamic_cfg: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    """One request: text-to-image, or an edit of `images` (PIL images, decoded at the edge).
    Unset fields (None) take the family's defaults via `resolve`."""

    prompt: str
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    seed: int | None = None
    num_images: int = 1
    max_sequence_length: int | None = None
    images: tuple = ()
    # solver overrides (None: the model folder's scheduler as configured)
    sampler: str | None = None
    flow_shift: float | None = None
    # video models: frames, frame rate, and the guidance scale of the second (low-noise) expert
    num_frames: int | None = None
    fps: int | None = None
    guidance_scale_2: float | None = None
    # skip-layer guidance (SD3, as diffusers): these blocks are left out of an extra conditional pass on
    # the steps between start and stop (fractions of the run); None: the family's defaults
    skip_guidance_layers: tuple[int, ...] | None = None
    skip_layer_guidance_scale: float | None = None
    skip_layer_guidance_start: float | None = None
    skip_layer_guidance_stop: float | None = None
    # step caching (when the engine runs one): False computes every step of this request in full
    cache: bool = True
    # layered models (Qwen-Image-Layered): how many RGBA layers to split the input image into
    layers: int | None = None
    # CogVideoX: dynamic CFG (None: the model's default, off unless its folder's ditserve.json turns it on)
    use_dynamic_cfg: bool | None = None

    def resolve(self, defaults: RequestDefaults, limits: ModelLimits) -> "GenerationRequest":
        """Fill unset fields from `defaults`, pick a seed if none, and validate against `limits`."""
        filled = {
            f.name: getattr(defaults, f.name)
            for f in fields(RequestDefaults)
            if f.name in _REQUEST_FIELDS and getattr(self, f.name) is None
        }
        images = tuple(self.images) if isinstance(self.images, (list, tuple)) else self.images
        if defaults.image_size_area and isinstance(images, tuple) and images and hasattr(images[-1], "size"):
            width, height = size_for_area(defaults.image_size_area, *images[-1].size)
            filled["width"] = self.width if self.width is not None else width
            filled["height"] = self.height if self.height is not None else height
        if self.seed is None:
            filled["seed"] = random.randrange(2**31)
        if isinstance(self.skip_guidance_layers, list):
            filled["skip_guidance_layers"] = tuple(self.skip_guidance_layers)
        req = replace(self, images=images, **filled)
        req.validate(limits)
        return req

    def validate(self, limits: ModelLimits) -> None:
        """Raise InvalidRequest naming the first bad field."""
        captioned = limits.captions and self.prompt in ("", " ")
        if not isinstance(self.prompt, str) or not (self.prompt.strip() or captioned):
            raise InvalidRequest("prompt must be a non-empty string", "prompt")
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            if text is not None and len(text) > limits.max_prompt_chars:
                raise InvalidRequest(
                    f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars}", name
                )
        for name in ("height", "width"):
            value = getattr(self, name)
            _check_int(name, value)
            if value % limits.size_multiple:
                raise InvalidRequest(
                    f"{name} must be a multiple of {limits.size_multiple}, got {value}", name
                )
            if not limits.min_size <= value <= limits.max_size:
                raise InvalidRequest(
                    f"{name} must be between {limits.min_size} and {limits.max_size}, got {value}", name
                )
        if self.height * self.width > limits.max_pixels:
            raise InvalidRequest(
                f"{self.width}x{self.height} is {self.height * self.width} pixels; "
                f"the limit is {limits.max_pixels}",
                "size",
            )
        _check_int("num_inference_steps", self.num_inference_steps)
        if not limits.min_steps <= self.num_inference_steps <= limits.max_steps:
            why = " for this model (its schedule ends at a terminal sigma)" if limits.min_steps > 1 else ""
            raise InvalidRequest(
                f"num_inference_steps must be between {limits.min_steps} and {limits.max_steps}{why}, "
                f"got {self.num_inference_steps}",
                "num_inference_steps",
            )
        _check_int("num_images", self.num_images)
        if not 1 <= self.num_images <= limits.max_num_images:
            raise InvalidRequest(
                f"num_images must be between 1 and {limits.max_num_images}, got {self.num_images}",
                "n",
            )
        for name in ("guidance_scale", "true_cfg_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a finite number, got {value!r}", name)
            if value < 0:
                raise InvalidRequest(f"{name} must be >= 0, got {value}", name)
        _check_int("seed", self.seed)
        if not 0 <= self.seed < 2**63:
            raise InvalidRequest(f"seed must be between 0 and 2**63-1, got {self.seed}", "seed")
        _check_int("max_sequence_length", self.max_sequence_length)
        if not 1 <= self.max_sequence_length <= limits.max_sequence_length:
            raise InvalidRequest(
                f"max_sequence_length must be between 1 and {limits.max_sequence_length}, "
                f"got {self.max_sequence_length}",
                "max_sequence_length",
            )
        if not isinstance(self.use_dynamic_cfg, bool):
            raise InvalidRequest(f"use_dynamic_cfg must be true or false, got {self.use_dynamic_cfg!r}",
                                 "use_dynamic_cfg")
        if self.use_dynamic_cfg and not limits.dynamic_cfg:
            raise InvalidRequest("use_dynamic_cfg is CogVideoX's; this model has no dynamic CFG", "use_dynamic_cfg")
        if not isinstance(self.cache, bool):
            raise InvalidRequest(f"cache must be true or false, got {self.cache!r}", "cache")
        _check_images(self.images, limits)
        _check_sampling(self.sampler, self.flow_shift, limits)
        _check_video(self, limits)
        if limits.refuse is not None:
            limits.refuse(self)
        _check_skip_layers(self, limits)
        _check_layers(self.layers, limits)

    @property
    def do_true_cfg(self) -> bool:
        """True CFG runs when a negative prompt is given and true_cfg_scale > 1 (as diffusers)."""
        return self.negative_prompt is not None and (self.true_cfg_scale or 0) > 1


def size_for_area(area: int, width: int, height: int, multiple: int = 32) -> tuple[int, int]:
    """(width, height) with the aspect ratio of width x height and about `area` pixels, each side
    rounded to a multiple of `multiple` (diffusers' Qwen-Image `calculate_dimensions`)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return round(w / multiple) * multiple, round(h / multiple) * multiple


def _check_images(images, limits: ModelLimits) -> None:
    from PIL import Image

    if not isinstance(images, tuple):
        raise InvalidRequest(f"images must be a tuple of PIL images, got {type(images).__name__}", "image")
    if images and not limits.max_images:
        raise InvalidRequest("this model generates from text only and takes no input image; "
                             "load an image-editing model (e.g. Qwen-Image-Edit) to edit", "image")
    if len(images) < limits.min_images:
        raise InvalidRequest(f"this model edits images: give {limits.min_images} input image(s) "
                             "(--image PATH, or the API's image field)", "image")
    if len(images) > limits.max_images:
        raise InvalidRequest(f"{len(images)} input images; this model takes at most {limits.max_images}", "image")
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise InvalidRequest(f"input image {i + 1} must be a PIL image, got {type(image).__name__}", "image")
        w, h = image.size
        if w * h > limits.max_input_pixels:
            raise InvalidRequest(f"input image {i + 1} is {w}x{h} = {w * h} pixels; "
                                 f"the limit is {limits.max_input_pixels}", "image")
        if min(w, h) < 1 or max(w, h) / min(w, h) > limits.max_input_aspect:
            raise InvalidRequest(f"input image {i + 1} is {w}x{h}; its sides may differ by at most "
                                 f"{limits.max_input_aspect:g}x", "image")


def _check_sampling(sampler, flow_shift, limits: ModelLimits) -> None:
    if sampler is not None and sampler not in limits.samplers:
        raise InvalidRequest(f"sampler must be one of {', '.join(limits.samplers)}, got {sampler!r}", "sampler")
    if flow_shift is not None:
        if isinstance(flow_shift, bool) or not isinstance(flow_shift, (int, float)) or not math.isfinite(flow_shift):
            raise InvalidRequest(f"flow_shift must be a finite number, got {flow_shift!r}", "flow_shift")
        if flow_shift <= 0:
            raise InvalidRequest(f"flow_shift must be > 0, got {flow_shift}", "flow_shift")


def _check_video(req: "GenerationRequest", limits: ModelLimits) -> None:
    if not limits.frame_multiple:
        for name in ("num_frames", "fps", "guidance_scale_2"):
            if getattr(req, name) not in (None, 0):
                raise InvalidRequest(f"{name} is for video models; this model makes images", name)
        return
    _check_int("num_frames", req.num_frames)
    m = limits.frame_multiple
    if req.num_frames < 1 or (req.num_frames - 1) % m or req.num_frames > limits.max_frames:
        raise InvalidRequest(f"num_frames must be {m}k+1 (1, {m + 1}, {2 * m + 1}, ...) and at most "
                             f"{limits.max_frames}, got {req.num_frames}", "num_frames")
    _check_int("fps", req.fps)
    if not 1 <= req.fps <= limits.max_fps:
        raise InvalidRequest(f"fps must be between 1 and {limits.max_fps}, got {req.fps}", "fps")
    value = req.guidance_scale_2
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value < 0):
        raise InvalidRequest(f"guidance_scale_2 must be a finite number >= 0, got {value!r}", "guidance_scale_2")


def _check_skip_layers(req: "GenerationRequest", limits: ModelLimits) -> None:
    for name in ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop"):
        value = getattr(req, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise InvalidRequest(f"{name} must be a finite number >= 0, got {value!r}", name)
    layers = req.skip_guidance_layers
    if layers is None:
        return
    if not limits.guidance_layers:
        raise InvalidRequest("skip_guidance_layers: this model offers no skip-layer guidance", "skip_guidance_layers")
    if (not isinstance(layers, tuple) or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < limits.guidance_layers
                       for i in layers)):
        raise InvalidRequest(f"skip_guidance_layers must be a non-empty list of block indices 0..."
                             f"{limits.guidance_layers - 1}, got {layers!r}", "skip_guidance_layers")


def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}", name)


def _check_layers(layers, limits: ModelLimits) -> None:
    if not limits.max_layers:
        if layers not in (None, 0):
            raise InvalidRequest("layers is for layered models (Qwen-Image-Layered); this model makes one "
                                 "image per request", "layers")
        return
    _check_int("layers", layers)
    if not 1 <= layers <= limits.max_layers:
        raise InvalidRequest(f"layers must be between 1 and {limits.max_layers}, got {layers}", "layers")


_REQUEST_FIELDS = frozenset(f.name for f in fields(GenerationRequest))
