"""The server part of the configuration: network, back-pressure and request limits."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ditserve.api import InvalidRequest, ModelLimits

MIB = 1024 * 1024


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
    # Operator caps, tighter than the model's own limits (None: the model's limit).
    max_pixels: int | None = None
    max_steps: int | None = None
    max_num_images: int | None = None
    # torch intra-op threads in the worker (None: torch's default).
    worker_threads: int | None = None

    def __post_init__(self):
        positive = {
            "max_queue": self.max_queue, "request_timeout_s": self.request_timeout_s,
            "drain_timeout_s": self.drain_timeout_s, "max_body_bytes": self.max_body_bytes,
            "max_upload_bytes": self.max_upload_bytes, "output_ttl_s": self.output_ttl_s,
            "max_pixels": self.max_pixels, "max_steps": self.max_steps, "max_num_images": self.max_num_images,
            "worker_threads": self.worker_threads,
        }
        for name, value in positive.items():
            if value is not None and not value > 0:
                raise InvalidRequest(f"{name} must be positive, got {value}", name)
        if not 0 <= self.port <= 65535:
            raise InvalidRequest(f"port must be between 0 and 65535, got {self.port}", "port")

    def limits_for(self, model: ModelLimits) -> ModelLimits:
        """The model's limits, tightened by the operator's caps."""
        caps = {"max_pixels": self.max_pixels, "max_steps": self.max_steps,
                "max_num_images": self.max_num_images}
        return replace(model, **{k: min(v, getattr(model, k)) for k, v in caps.items() if v is not None})
