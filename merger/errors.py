"""User-facing errors: each message is one line saying what is wrong and how to fix it."""


class MergerError(Exception):
    """Base of every error a user can cause or fix; the CLI and the app print it without a traceback."""


class RecipeError(MergerError):
    """The YAML recipe is malformed, names an unknown method or parameter, or has a value out of range."""


class ModelError(MergerError):
    """A model cannot be read or cannot be merged with the others (layout, shapes, files)."""


class HubError(MergerError):
    """The Hugging Face Hub refused or failed a request (access, not found, rate limit, network)."""


class GGUFError(MergerError):
    """GGUF conversion, quantization or verification failed."""


class CancelledError(MergerError):
    """The user cancelled the job; everything it wrote has been removed."""
