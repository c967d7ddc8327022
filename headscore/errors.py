"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class HeadscoreError(Exception):
    """Bad input or an unsupported setup, described in one line that says what to do."""


class UnsupportedModelError(HeadscoreError):
    """The model's attention cannot be gated through transformers' attention registry."""
