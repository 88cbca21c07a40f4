"""The server part of the configuration: network, back-pressure, request limits and their defaults."""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from ditserve.api import InvalidRequest, ModelLimits, RequestDefaults

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# What a request may ask for when the operator sets no cap, sized from the loaded model's defaults
# (which are its trained resolution and its recommended step count):
PIXELS_OVER_DEFAULT = 4  # 4x the default image area (2x each side): the resolutions DiTs are trained for
STEPS_OVER_DEFAULT = 4  # 4x the default steps: past that an image hardly changes while the worker is held
MIN_STEP_CAP = 50  # ...but never below 50, so a 4-step model still allows a careful 20-50 step run
DEFAULT_MAX_NUM_IMAGES = 4  # n multiplies one request's work; 4 keeps it within a few default images
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ServerConfig:
    """How `ditserve serve` listens, queues and limits requests; built once by the CLI."""

    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queue: int = 64
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 600.0
    max_body_bytes: int = 1 * MIB
    max_upload_bytes: int = 32 * MIB
    output_dir: str | None = None
    output_ttl_s: float = 3600.0
    output_max_bytes: int = 1024 * MIB
    # Operator caps (None: the server's default sized from the model; never above the model's own limit).
    max_pixels: int | None = None
    max_steps: int | None = None
    max_num_images: int | None = None
    # Requests one client (address) may have queued or running (None: a quarter of --max-queue).
    max_client_requests: int | None = None
    # Connections: open at once (more get 503), and seconds a client has to send a request's headers.
    max_connections: int = 256
    header_timeout_s: float = 10.0
    # Host header allow-list (None: the bound name and loopback names); "*" allows any.
    allowed_hosts: tuple[str, ...] | None = None
    # The URL clients reach the server at (behind a proxy); url outputs are built from it.
    public_url: str | None = None
    # Addresses whose X-Forwarded-For / X-Forwarded-Proto headers are trusted (a local reverse proxy).
    forwarded_allow_ips: str = "127.0.0.1"
    # torch intra-op threads in the worker (None: torch's default).
    worker_threads: int | None = None
    # Video jobs (/v1/videos): where their SQLite store and files live (None: a per-user cache folder),
    # and how long one job may run (from when the worker takes it) before it fails.
    data_dir: str | None = None
    job_timeout_s: float = 3600.0
    # Disk the video jobs' files may use; finished jobs are deleted oldest first to stay within it.
    data_max_bytes: int = 10 * 1024 * MIB

    def __post_init__(self):
        positive = {
            "max_queue": self.max_queue, "request_timeout_s": self.request_timeout_s,
            "drain_timeout_s": self.drain_timeout_s, "max_body_bytes": self.max_body_bytes,
            "max_upload_bytes": self.max_upload_bytes, "output_ttl_s": self.output_ttl_s,
            "output_max_bytes": self.output_max_bytes, "max_pixels": self.max_pixels,
            "max_steps": self.max_steps, "max_num_images": self.max_num_images,
            "max_client_requests": self.max_client_requests, "max_connections": self.max_connections,
            "header_timeout_s": self.header_timeout_s, "worker_threads": self.worker_threads,
            "job_timeout_s": self.job_timeout_s, "data_max_bytes": self.data_max_bytes,
        }
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise InvalidRequest(f"{name} must be positive, got {value}", name)
        if not 0 <= self.port <= 65535:
            raise InvalidRequest(f"port must be between 0 and 65535, got {self.port}", "port")
        if self.public_url is not None:
            _check_public_url(self.public_url)
        if self.allowed_hosts is not None and not [h for h in self.allowed_hosts if h.strip()]:
            raise InvalidRequest("allowed_hosts is empty; give host names, or * for any", "allowed_hosts")

    @property
    def client_limit(self) -> int:
        """Requests one client may have in flight: so one client cannot take the whole queue."""
        return self.max_client_requests or max(1, self.max_queue // 4)

    def limits_for(self, model: ModelLimits, defaults: RequestDefaults) -> ModelLimits:
        """The model's limits under the operator's caps, or under the server's defaults sized from the
        model's defaults; raises InvalidRequest when the caps leave no request the model can run."""
        caps = {
            "max_pixels": self.max_pixels or PIXELS_OVER_DEFAULT * defaults.width * defaults.height,
            "max_steps": self.max_steps or max(MIN_STEP_CAP, STEPS_OVER_DEFAULT * defaults.num_inference_steps),
            "max_num_images": self.max_num_images or DEFAULT_MAX_NUM_IMAGES,
        }
        limits = replace(model, **{k: min(v, getattr(model, k)) for k, v in caps.items()})
        if limits.max_steps < limits.min_steps:
            raise InvalidRequest(f"--max-steps {limits.max_steps} is below this model's minimum of "
                                 f"{limits.min_steps} steps; no request could run", "max_steps")
        smallest = _round_up(limits.min_size, limits.size_multiple) ** 2
        if limits.max_pixels < smallest:
            raise InvalidRequest(f"--max-pixels {limits.max_pixels} is below this model's smallest image "
                                 f"({smallest} pixels); no request could run", "max_pixels")
        return limits

    def defaults_for(self, defaults: RequestDefaults, limits: ModelLimits) -> RequestDefaults:
        """The model's request defaults, lowered (and logged) where `limits` are tighter, so a request
        that leaves a field out is never refused for it."""
        changed = {}
        if defaults.num_inference_steps > limits.max_steps:
            changed["num_inference_steps"] = limits.max_steps
        if defaults.width * defaults.height > limits.max_pixels:
            changed["width"], changed["height"] = _fit(defaults.width, defaults.height, limits)
        if defaults.image_size_area > limits.max_pixels:
            # an edit's size follows its input's aspect at about this area; sides round up by < 32 px
            changed["image_size_area"] = max(limits.min_size ** 2, (math.isqrt(limits.max_pixels) - 32) ** 2)
        for name, value in changed.items():
            log.warning("default %s lowered from %s to %s to fit the server's caps", name,
                        getattr(defaults, name), value)
        return replace(defaults, **changed)

    def jobs_dir(self) -> str:
        """The video-job folder: --data-dir, else ~/.cache/ditserve/jobs (XDG_CACHE_HOME honoured)."""
        from ditserve.config.env import cache_dir

        return self.data_dir or str(cache_dir() / "jobs")

    def host_allow_list(self) -> frozenset[str] | None:
        """Host header names served (lower case, no port), or None for any. IP literals always pass:
        a DNS-rebinding page sends its own domain name as Host, never an address."""
        if self.allowed_hosts is not None:
            names = {h.strip().lower().rstrip(".") for h in self.allowed_hosts if h.strip()}
        else:
            names = set(LOOPBACK_NAMES)
            if self.host in _WILDCARDS:  # reachable by any of this machine's names
                names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
            else:
                names.add(self.host.lower())
        if self.public_url is not None:
            names.add(urlsplit(self.public_url).hostname)
        return None if "*" in names else frozenset(names)


def _check_public_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise InvalidRequest(f"public_url must be an http(s) URL with a host and no query, got {url!r}",
                             "public_url")


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _fit(width: int, height: int, limits: ModelLimits) -> tuple[int, int]:
    """The largest size with this aspect ratio within `limits.max_pixels`, sides multiples of the model's."""
    scale = math.sqrt(limits.max_pixels / (width * height))
    m = limits.size_multiple
    w = max(_round_up(limits.min_size, m), int(width * scale) // m * m)
    h = max(_round_up(limits.min_size, m), int(height * scale) // m * m)
    while w * h > limits.max_pixels:  # the minimum side pushed it over: shrink the longer one
        if w >= h:
            w -= m
        else:
            h -= m
    return w, h
