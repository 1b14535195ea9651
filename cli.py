"""Run onnxfuse from a checkout without installing it: `python cli.py merge a.onnx b.onnx -o fused.onnx`."""
from onnxfuse.cli import main

if __name__ == "__main__":
    main(prog_name="onnxfuse")
