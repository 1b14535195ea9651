"""Model I/O in four parts: `wire` (the protobuf wire scan and writer), `loading` (members, external data,
`TensorTable`, refusals), `matching` (members matched by structure, opsets) and `saving` (output checks,
atomic save). The names the rest of onnxfuse uses are re-exported here."""
from .loading import (FLOAT_TYPES, Member, TensorTable, drop_unread, fresh_name, light_model, load_member,
                      nested_tensors, parse_model, read_model, tensor_nbytes, unshare_constants)
from .matching import check_compatible
from .saving import check_output_path, save_model

__all__ = ["FLOAT_TYPES", "Member", "TensorTable", "check_compatible", "check_output_path", "drop_unread",
           "fresh_name", "light_model", "load_member", "nested_tensors", "parse_model", "read_model", "save_model",
           "tensor_nbytes", "unshare_constants"]
