"""The runtime guard names the graph's own node when onnxruntime's error names one of its fused nodes."""
import pytest

from onnxfuse import runtime
from onnxfuse.errors import UnsupportedGraphError
from graphs import gemm_mlp


def test_a_fused_node_in_the_error_is_traced_back_to_the_graphs_node(monkeypatch):
    model = gemm_mlp(0)
    node = model.graph.node[0]
    calls = []

    def fake(source, feeds, run=True, optimize=True):
        calls.append(optimize)
        if source is model:
            name = "gemm_output_reshape_token_3_new_reshape" if optimize else node.name
            raise RuntimeError(f"Non-zero status code returned while running {node.op_type} node. Name:'{name}' "
                               f"Status Message: bad shape")
        return {}
    monkeypatch.setattr(runtime, "_session_outputs", fake)
    with pytest.raises(UnsupportedGraphError, match=f"at node '{node.name}' \\({node.op_type}\\): bad shape"):
        runtime.check_runs(model, gemm_mlp(1), "m.onnx")
    assert calls[-2:] == [True, False]
