"""Export of trained models to the ONNX model package, its validation and quantization."""
