"""Checkpoint -> ONNX export with Grad-CAM outputs, verified against PyTorch."""
