"""The torch-free runtime: what a device needs to run a calm-edge model package.

    from calm_edge.runtime import Model, GeneratorParams, Generator, generate, stream

    model = Model("models/calm-small-int4", provider="cpu", threads=2)
    print(generate(model, "The history of", GeneratorParams(max_new_tokens=64, seed=1)).text)

    generator = Generator(model, [model.tokenizer.encode("The history of")], GeneratorParams(seed=1))
    while not generator.done:                     # the caller owns the loop
        new_ids = generator.step()

    engine = Engine(model, max_batch=16)          # in-flight batching: requests join and leave between steps

It may import numpy, onnxruntime and sentencepiece, never torch (a test checks this in a
process where torch cannot be imported).
"""
from calm_edge.runtime.engine import Engine, RequestOutput
from calm_edge.runtime.generator import Generator, GeneratorParams, generate_tokens
from calm_edge.runtime.model import Model, available_providers
from calm_edge.runtime.package import Manifest
from calm_edge.runtime.rng import RandomStream
from calm_edge.runtime.sampling import TemperatureSampler
from calm_edge.runtime.text_generation import GenerationResult, generate, stream
from calm_edge.runtime.timing import Trace
from calm_edge.tokenizer import Tokenizer

__all__ = ["Engine", "GenerationResult", "Generator", "GeneratorParams", "Manifest", "Model", "RandomStream",
           "RequestOutput", "TemperatureSampler", "Tokenizer", "Trace", "available_providers", "generate", "generate_tokens", "stream"]
