"""The PyTorch reference: the runtime's `Generator` over the trained torch modules.

`calm_edge.runtime.generator` holds the one generation loop (prompts, eos left-fill of partial
chunks, sampling, randomness, stopping). `TorchModel` puts a trained CalmModel or ARModel
behind the same model interface as the runtime's `Model` (kind, K, special ids, context,
tokenizer, `new_state`), and `TorchStepState` runs its modules where `StepState` runs ONNX
graphs. The two therefore produce the same tokens for the same seed unless the graphs compute
different numbers, which is what export validation checks, and what `calm-edge generate
--checkpoint` and `eval brierlm` use.
"""
import time

import numpy as np
import torch

from calm_edge.models.calm import CalmModel
from calm_edge.runtime.generator import generate_tokens
from calm_edge.training.language_models import load_language_model


class TorchModel:
    """A trained CALM or AR module (or checkpoint, with `load`) behind the runtime's model interface."""

    def __init__(self, module, tokenizer=None, checkpoint=None):
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.checkpoint = checkpoint  # the training Checkpoint it was loaded from, if any
        config = module.config
        self.kind = "calm" if isinstance(module, CalmModel) else "ar"
        self.eos_id, self.pad_id = config.tokenizer.eos_id, config.tokenizer.pad_id
        self.prompt_fill = config.calm.prompt_fill if self.kind == "calm" else "left-eos"
        if self.kind == "calm":
            self.chunk_size, self.noise_size = config.autoencoder.chunk_size, config.calm.noise_size
            self.max_context = config.calm.backbone.max_positions
        else:
            self.chunk_size, self.noise_size = 1, 0
            self.max_context = config.ar.backbone.max_positions

    @classmethod
    def load(cls, checkpoint):
        """The model of a CALM or AR training run (or one of its checkpoint folders), with its tokenizer."""
        module, saved = load_language_model(checkpoint)
        return cls(module, saved.tokenizer(), saved)

    def new_state(self, batch, capacity):
        return TorchStepState(self)

    # The modules one call at a time, as the runtime's Model offers its graphs (evaluation).

    @torch.no_grad()
    def hidden_states(self, input_ids):
        """Every chunk's hidden state [S, H] of one sequence, from an empty cache."""
        hidden, _ = self.module.hidden_states(torch.as_tensor(np.asarray(input_ids, np.int64)).reshape(1, -1))
        return hidden[0].numpy()

    @torch.no_grad()
    def sample_latents(self, hidden, noise):
        return self.module.sample_latents(torch.from_numpy(np.ascontiguousarray(hidden, np.float32)),
                                          torch.from_numpy(np.ascontiguousarray(noise, np.float32))).numpy()

    @torch.no_grad()
    def decode(self, latents):
        return self.module.decode_tokens(torch.from_numpy(np.ascontiguousarray(latents, np.float32))).numpy()


class TorchStepState:
    """One generation's mask and cache over the torch modules: numpy in, numpy out, as `StepState`."""

    def __init__(self, model: TorchModel):
        self.model, self.module = model, model.module
        self.mask = self.past = None
        step = "backbone" if model.kind == "calm" else "ar"
        self.timings = {name: 0.0 for name in ((step, "energy_head", "decoder") if model.kind == "calm" else (step,))}
        self._step = step

    @torch.no_grad()
    def _run(self, input_ids, position_ids):
        began = time.perf_counter()
        args = (torch.from_numpy(input_ids), torch.from_numpy(self.mask), torch.from_numpy(position_ids), self.past)
        if self.model.kind == "calm":
            out, self.past = self.module.hidden_states(*args)
        else:
            out, self.past = self.module.logits(*args)
        self.timings[self._step] += time.perf_counter() - began
        return out[:, -1].numpy()

    def start(self, input_ids, attention_mask, position_ids):
        self.mask, self.past = attention_mask, None
        return self._run(input_ids, position_ids)

    def advance(self, input_ids, position_ids):
        self.mask = np.concatenate([self.mask, np.ones((len(self.mask), 1), dtype=np.int64)], axis=1)
        return self._run(input_ids, position_ids)

    @torch.no_grad()
    def sample_latents(self, hidden, noise):
        began = time.perf_counter()
        latents = self.module.sample_latents(torch.from_numpy(hidden), torch.from_numpy(noise)).numpy()
        self.timings["energy_head"] += time.perf_counter() - began
        return latents

    @torch.no_grad()
    def decode(self, latents):
        began = time.perf_counter()
        ids = self.module.decode_tokens(torch.from_numpy(latents)).numpy()
        self.timings["decoder"] += time.perf_counter() - began
        return ids


def generate(module, prompts, params):
    """New token ids for each prompt (lists of ids) from a trained CalmModel or ARModel."""
    return generate_tokens(TorchModel(module), prompts, params)
