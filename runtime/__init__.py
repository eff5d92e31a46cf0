"""The torch-free runtime: what a device needs to run a calm-edge model package.

    from calm_edge.runtime import Model, GeneratorParams, generate, stream

    model = Model("models/calm-small", provider="cpu", threads=2)
    print(generate(model, "The history of", GeneratorParams(max_new_tokens=64, seed=1)).text)

It may import numpy, onnxruntime and sentencepiece, never torch (a test checks this in a
process where torch cannot be imported).
"""
from calm_edge.runtime.generator import GeneratorParams
from calm_edge.runtime.model import Model, available_providers
from calm_edge.runtime.rng import RandomStream
from calm_edge.runtime.sampling import TemperatureSampler
from calm_edge.runtime.text_generation import GenerationResult, generate, stream
from calm_edge.tokenizer import Tokenizer

__all__ = ["GenerationResult", "GeneratorParams", "Model", "RandomStream", "TemperatureSampler", "Tokenizer",
           "available_providers", "generate", "stream"]
