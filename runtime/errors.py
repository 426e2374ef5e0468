"""The exceptions facert raises. Every one is a FacertError, so a caller that catches that one
class sees every bad input and bad file; the subclasses say which kind it was (the CLI prints
any of them on one line, a server maps them to status codes)."""


class FacertError(Exception):
    """Bad input (unreadable image, wrong shape, empty text, unknown attribute) or an invalid
    model/checkpoint. The message says what is wrong and what to do; the CLI prints it without
    a traceback."""


class InvalidArgument(FacertError):
    """A parameter of the wrong type or out of its range (text, n, seed, top_k, views...)."""


class LimitExceeded(InvalidArgument):
    """A request larger than the model's configured Limits (faces, drawings, text, pixels)."""


class ImageError(FacertError):
    """An image that cannot be read or decoded, or that holds no usable pixels."""


class ModelFileError(FacertError):
    """A checkpoint, model directory or engine directory that is malformed, corrupt or stale."""


class FacertOverloaded(FacertError):
    """The model's queue is full: try again after `retry_after` seconds (an estimate)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(FacertError):
    """A request that cannot finish by its deadline (refused at admission) or that ran past it
    (cancelled, its cache slots freed)."""


class EngineFailure(FacertError):
    """The backend failed while running a step: the requests with rows in that step fail with
    this error, every other request goes on. Also raised once the model is closed or its
    engine thread has stopped."""
