"""onnxfuse: fuse several trained networks of one architecture, given as ONNX files, into one model of the
original size by Neuron Transplantation."""
__version__ = "0.1.0"

from .api import (Fusion, NoGainError, concat, evaluate, finetune, fuse, inspect, merge, prune,  # noqa: E402
                  quantize, soup)
from .errors import (IncompatibleMembersError, InputError, OnnxFuseError, OutputError,  # noqa: E402
                     UnsupportedGraphError)
from .methods import FusionMethod, register  # noqa: E402
from .options import FuseOptions, FusionReport  # noqa: E402

__all__ = ["merge", "concat", "prune", "quantize", "soup", "inspect", "finetune", "evaluate", "benchmark", "fuse",
           "Fusion", "FuseOptions", "FusionReport", "FusionMethod", "register", "OnnxFuseError", "InputError",
           "IncompatibleMembersError", "UnsupportedGraphError", "OutputError", "NoGainError", "__version__"]


def __getattr__(name: str):
    """`onnxfuse.benchmark` (onnxfuse.bench.benchmark) is imported when first used: it needs onnxruntime."""
    if name == "benchmark":
        from .bench import benchmark
        return benchmark
    raise AttributeError(f"module 'onnxfuse' has no attribute '{name}'")
