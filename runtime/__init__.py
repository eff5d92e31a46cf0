"""The torch-free runtime: what a device needs to run a calm-edge model package.

It may import numpy, onnxruntime and sentencepiece, never torch (a test checks this in a
process where torch cannot be imported).
"""
from calm_edge.runtime.rng import RandomStream
from calm_edge.runtime.sampling import TemperatureSampler
from calm_edge.tokenizer import Tokenizer

__all__ = ["RandomStream", "TemperatureSampler", "Tokenizer"]
