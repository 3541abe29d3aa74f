"""Deployment: ONNX export of a checkpoint (export, needs torch) and scoring with ONNX Runtime
alone (runtime, imports no torch)."""
