"""Reference generation in PyTorch: the runtime's loop over the torch modules.

`calm_edge.runtime.generator` holds the one generation loop (prompts, eos left-fill of partial
chunks, sampling, randomness, stopping). Here it drives the trained PyTorch modules through
`TorchBackend`; the runtime drives the exported ONNX graphs through the same loop, so the two
produce the same tokens for the same seed unless the graphs compute different numbers (which
export validation checks).
"""
import numpy as np
import torch

from calm_edge.runtime.generator import Backend, GeneratorParams, fill_to_chunks, generate_tokens

# The reference's settings are the runtime's GeneratorParams.
GenerationSettings = GeneratorParams

__all__ = ["GenerationSettings", "GeneratorParams", "TorchBackend", "TorchModel", "fill_to_chunks", "generate"]


class TorchBackend(Backend):
    """A CalmModel or ARModel behind the loop's Backend interface (numpy in, numpy out)."""

    def __init__(self, model):
        from calm_edge.models.calm import CalmModel

        self.model = model.eval()
        config = model.config
        self.kind = "calm" if isinstance(model, CalmModel) else "ar"
        self.eos_id, self.pad_id = config.tokenizer.eos_id, config.tokenizer.pad_id
        if self.kind == "calm":
            self.chunk_size, self.noise_size = config.autoencoder.chunk_size, config.calm.noise_size
            self.max_context = config.calm.backbone.max_positions
        else:
            self.chunk_size, self.noise_size = 1, 0
            self.max_context = config.ar.backbone.max_positions
        self.mask = self.past = None

    @torch.no_grad()
    def _step(self, input_ids, position_ids):
        args = (torch.from_numpy(input_ids), torch.from_numpy(self.mask), torch.from_numpy(position_ids), self.past)
        if self.kind == "calm":
            out, self.past = self.model.hidden_states(*args)
        else:
            out, self.past = self.model.logits(*args)
        return out[:, -1].numpy()

    def start(self, input_ids, attention_mask, position_ids):
        self.mask, self.past = attention_mask, None
        return self._step(input_ids, position_ids)

    def advance(self, input_ids, position_ids):
        self.mask = np.concatenate([self.mask, np.ones((len(self.mask), 1), dtype=np.int64)], axis=1)
        return self._step(input_ids, position_ids)

    @torch.no_grad()
    def sample_latents(self, hidden, noise):
        return self.model.sample_latents(torch.from_numpy(hidden), torch.from_numpy(noise)).numpy()

    @torch.no_grad()
    def decode(self, latents):
        return self.model.decode_tokens(torch.from_numpy(latents)).numpy()


class TorchModel:
    """A trained CALM or AR checkpoint behind the runtime's text API (`runtime.generate`, `stream`)."""

    def __init__(self, checkpoint):
        from calm_edge.tokenizer import Tokenizer
        from calm_edge.training.language_models import load_language_model

        self.module, saved = load_language_model(checkpoint)
        self.tokenizer = Tokenizer(saved.tokenizer_path)
        backend = TorchBackend(self.module)
        self.kind, self.chunk_size, self.max_context = backend.kind, backend.chunk_size, backend.max_context

    def new_state(self):
        return TorchBackend(self.module)


def generate(model, prompts, settings: GeneratorParams):
    """New token ids for each prompt (lists of ids) from a CalmModel or ARModel."""
    return generate_tokens(TorchBackend(model), [list(p) for p in prompts], settings)
