"""onnxfuse: fuse several trained networks of one architecture, given as ONNX files, into one model of the
original size by Neuron Transplantation."""
__version__ = "0.1.0"

from .api import (Fusion, NoGainError, benchmark, concat, evaluate, finetune, fuse, inspect, merge,  # noqa: E402
                  prune, quantize, soup)
from .errors import (IncompatibleMembersError, InputError, OnnxFuseError, OutputError,  # noqa: E402
                     UnsupportedGraphError)

__all__ = ["merge", "concat", "prune", "quantize", "soup", "inspect", "finetune", "evaluate", "benchmark", "fuse",
           "Fusion", "OnnxFuseError", "InputError", "IncompatibleMembersError", "UnsupportedGraphError", "OutputError",
           "NoGainError", "__version__"]
