"""The one exception type facert raises for bad input and bad model files."""


class FacertError(Exception):
    """Bad input (unreadable image, wrong shape, empty text, unknown attribute) or an invalid
    model/checkpoint. The message says what is wrong and what to do; the CLI prints it without
    a traceback."""
