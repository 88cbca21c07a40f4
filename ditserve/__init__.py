"""ditserve: inference and serving for diffusion transformers.

`Generator.from_pretrained(path_or_hf_id)` loads a model (with no argument: the bundled demo model,
whose folder is `ditserve.demo.MODEL_DIR`) and `Generator.generate(prompt, ...)` runs it.
"""

from ditserve.api import (
    EngineError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequest,
    Overloaded,
)

__version__ = "0.1.0"
__all__ = ["EngineError", "GenerationOutput", "GenerationRequest", "Generator", "InvalidRequest", "Overloaded"]


def __getattr__(name: str):
    # Generator pulls in torch, transformers and diffusers: import it only when asked for.
    if name == "Generator":
        from ditserve.runtime.generator import Generator

        return Generator
    raise AttributeError(f"module 'ditserve' has no attribute {name!r}")


def __dir__() -> list[str]:
    # the lazy Generator too, so dir(), help() and completion show the whole public API
    return sorted({*globals(), *__all__})
