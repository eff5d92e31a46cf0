"""`calm-edge eval package`: the quality of a model package as deployed, through its ONNX graphs.

- BrierLM (Brier-1..4) for CALM and AR packages: `language_model.evaluate_package`, the
  same positions, streams and estimator as `eval brierlm` on the PyTorch checkpoint, with the
  runtime's `Model` in place of the PyTorch modules.
- CALM only, token reconstruction through the package's decoder graph. A package deploys no
  encoder (generation never needs one), so the latents come from the autoencoder checkpoint the
  model was trained with: `autoencoder`, or by default the one named in the package's
  provenance when that folder exists. Decision: we keep the package format as it is rather than
  add an encoder graph that no runtime would run; reconstruction is a developer's figure and
  the developer has the checkpoint. Its fp32 encoder also isolates what quantizing the decoder
  costs. Without a checkpoint the report says why reconstruction is missing. This part needs
  torch (the `train` extra); BrierLM does not.
"""
import time
from pathlib import Path

from calm_edge.errors import CalmEdgeError
from calm_edge.evaluation.language_model import evaluate_package
from calm_edge.evaluation.settings import EvalSettings
from calm_edge.runtime.model import Model


def default_autoencoder(manifest):
    """The autoencoder checkpoint recorded in the package's provenance, if it is on this machine."""
    recorded = manifest.provenance.get("autoencoder", {}).get("checkpoint")
    return recorded if recorded and Path(recorded).is_dir() else None


def reconstruction(model, autoencoder, text, max_tokens=None, progress=False):
    """Token and chunk accuracy of the package's decoder on the posterior means of `autoencoder`."""
    from calm_edge.evaluation.autoencoder import evaluate_autoencoder  # torch: only reconstruction needs it
    from calm_edge.training.autoencoder import load_autoencoder

    ae, saved = load_autoencoder(autoencoder)
    if saved.tokenizer().sha256() != model.tokenizer.sha256():
        raise CalmEdgeError(f"the autoencoder in {saved.folder} has another tokenizer than the package {model.path}; "
                            "pass the autoencoder the CALM model was trained with (--autoencoder)")
    manifest = model.manifest
    if (ae.chunk_size, ae.latent_size) != (manifest.chunk_size, manifest.latent_size):
        raise CalmEdgeError(f"the autoencoder in {saved.folder} has K={ae.chunk_size}, latent {ae.latent_size}; the "
                            f"package has K={manifest.chunk_size}, latent {manifest.latent_size}; pass the "
                            "autoencoder the CALM model was trained with (--autoencoder)")
    report = evaluate_autoencoder(autoencoder, text, max_tokens=max_tokens, noise_scales=(), progress=progress,
                                  decode=model.decode)
    return {"autoencoder": report["checkpoint"], "tokens_evaluated": report["tokens_evaluated"],
            "token_accuracy": report["token_accuracy"], "chunk_accuracy": report["chunk_accuracy"],
            "latents": "the autoencoder checkpoint's posterior means, decoded by the package's decoder graph"}


def evaluate_model_package(path, text, settings=EvalSettings(), autoencoder=None, reconstruction_tokens=None,
                           threads=None, progress=True, samples=None):
    """The report of `calm-edge eval package` for the package at `path` on `text` (a TextSource).

    `samples`: see `language_model.evaluate_brierlm`.
    """
    started = time.perf_counter()
    model = Model(path, threads=threads)
    manifest = model.manifest
    report = {
        "package": str(path),
        "kind": model.kind,
        "quantization": manifest.quantization_mode,
        "graph_modes": manifest.graph_modes,
        "graph_bytes": {name: g.total_bytes for name, g in manifest.graphs.items()},
        **evaluate_package(model, text, settings, progress=progress, samples=samples),
    }
    if model.kind == "calm":
        autoencoder = autoencoder or default_autoencoder(manifest)
        if autoencoder is None:
            report["reconstruction"] = {"skipped": "no autoencoder checkpoint: the package has no encoder; "
                                                   "pass --autoencoder RUN to measure reconstruction"}
        else:
            report["reconstruction"] = reconstruction(model, autoencoder, text, max_tokens=reconstruction_tokens,
                                                      progress=progress)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report
