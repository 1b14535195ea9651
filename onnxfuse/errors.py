"""One exception family: the CLI turns any of these into one line on stderr and exit code 2."""


class OnnxFuseError(Exception):
    """Base class of every error onnxfuse reports to its user."""


class InputError(OnnxFuseError):
    """A model file is missing, unreadable, not ONNX, or otherwise unusable."""


class IncompatibleMembersError(OnnxFuseError):
    """The members do not share one architecture."""


class UnsupportedGraphError(OnnxFuseError):
    """The graph has an op or pattern the channel-group analysis cannot handle."""


class OutputError(OnnxFuseError):
    """The output path is unusable (exists without --force, equals an input, ...)."""
