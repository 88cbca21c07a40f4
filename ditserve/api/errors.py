"""The error kinds every edge maps: 400/exit 2, 429/503, 500, and a cancelled run."""


class DitserveError(Exception):
    """Base of ditserve's own errors."""


class InvalidRequest(DitserveError, ValueError):
    """The caller asked for something we cannot do; raised before any model work.

    `param` names the offending field when there is one (OpenAI's error envelope carries it).
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class Overloaded(DitserveError):
    """The engine cannot take more work now; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class EngineError(DitserveError):
    """Something failed inside the engine; the caller did nothing wrong."""


class Cancelled(DitserveError):
    """The caller no longer wants the result; raised at a stage boundary or between steps."""
