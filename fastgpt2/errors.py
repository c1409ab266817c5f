"""The base of every error fastgpt2 raises for a problem the user can fix (a ValueError)."""


class FastGPT2Error(ValueError):
    """A request fastgpt2 cannot serve; the message names the problem and the fix."""


class BackendError(FastGPT2Error):
    """A backend that cannot run where it was asked to."""
