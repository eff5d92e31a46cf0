"""How well a trained autoencoder reconstructs text, and how robust its latent space is.

The token stream (a `calm_edge.text_source.TextSource`) is cut into consecutive chunks of K tokens (a last
partial chunk is dropped). Each chunk is encoded to its posterior (mean, sigma) and decoded by
argmax under several latents:

- the posterior mean: `token_accuracy` (share of tokens right) and `chunk_accuracy` (share of
  chunks with all K tokens right), the reconstruction figures;
- a posterior sample, mean + sigma * eps: what the CALM model is trained to predict;
- `most_missed_tokens`: the tokens most often reconstructed wrongly from the mean, with how
  often they occur (a token the training data never held, e.g. WikiText's "@", shows up here);
- the mean plus isotropic Gaussian noise of absolute standard deviation `scale` in every latent
  dimension, for each of NOISE_SCALES: the robustness table. The posterior's own scale
  (`posterior.mean_rms`, the root-mean-square of the mean's entries, and `posterior.sigma_mean`)
  is reported beside it, so a scale can be read relative to the latent's size.

Noise comes from a seeded generator, so the same checkpoint and data give the same numbers.

`decode` replaces the checkpoint's own decoder, e.g. by a model package's deployed (and maybe
quantized) decoder graph: the encoder stays the checkpoint's, so the figures then measure what
the deployed decoder does with the latents the trained encoder gives.
"""
import torch
from tqdm import tqdm

from calm_edge.training.autoencoder import load_autoencoder

NOISE_SCALES = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def evaluate_autoencoder(checkpoint_path, text, max_tokens=None, batch_chunks=2048, noise_scales=NOISE_SCALES, seed=0,
                         progress=False, decode=None):
    """The report described above, on `text` (a TextSource).

    `decode(latents [n, latent] numpy) -> ids [n, K]` overrides the checkpoint's decoder.
    """
    model, saved = load_autoencoder(checkpoint_path)
    decode_tokens = model.decode_tokens if decode is None else _numpy_decoder(decode)
    K = model.chunk_size
    tokenizer = saved.tokenizer()
    tokens, data = text.load_tokens(tokenizer, max_tokens=max_tokens, progress=progress)
    chunks = torch.from_numpy(tokens[: len(tokens) // K * K]).view(-1, K)
    if len(chunks) == 0:
        raise ValueError("unreachable: TextSource.load_tokens returns at least one token")  # pragma: no cover

    generator = torch.Generator().manual_seed(seed)
    conditions = ["mean", "sample"] + [f"noise_{scale}" for scale in noise_scales]
    right_tokens = dict.fromkeys(conditions, 0)
    right_chunks = dict.fromkeys(conditions, 0)
    mean_square, sigma_sum = 0.0, 0.0
    missed = torch.zeros(model.vocab_size, dtype=torch.int64)
    starts = range(0, len(chunks), batch_chunks)
    with torch.no_grad():
        for start in tqdm(starts, desc="evaluating", unit="batch", disable=not progress, leave=False):
            batch = chunks[start:start + batch_chunks]
            mean, logstd = model.encode(batch)
            sigma = logstd.exp()
            mean_square += mean.pow(2).sum().item()
            sigma_sum += sigma.sum().item()
            latents = {"mean": mean, "sample": mean + sigma * _normal(mean, generator)}
            for scale in noise_scales:
                latents[f"noise_{scale}"] = mean + scale * _normal(mean, generator)
            for name, latent in latents.items():
                correct = decode_tokens(latent) == batch
                right_tokens[name] += int(correct.sum())
                right_chunks[name] += int(correct.all(-1).sum())
                if name == "mean":
                    missed += torch.bincount(batch[~correct], minlength=model.vocab_size)

    n_chunks = len(chunks)
    n_tokens = n_chunks * K
    n_values = n_chunks * model.latent_size

    def accuracy(name):
        return {"token_accuracy": right_tokens[name] / n_tokens, "chunk_accuracy": right_chunks[name] / n_chunks}

    return {
        "checkpoint": str(saved.folder),
        "step": saved.trainer.get("step"),
        "chunk_size": K,
        "latent_size": model.latent_size,
        "parameters": model.num_parameters(),
        "data": data,
        "text_form": "wikitext-detokenized" if text.detokenize == "wikitext" else "as-is",
        "tokens_evaluated": n_tokens,
        "chunks_evaluated": n_chunks,
        **accuracy("mean"),
        "most_missed_tokens": _most_missed(missed, chunks, tokenizer),
        "posterior": {"mean_rms": (mean_square / n_values) ** 0.5, "sigma_mean": sigma_sum / n_values},
        "posterior_sample": accuracy("sample"),
        "noise": "latent = posterior mean + scale * N(0, I), scale an absolute standard deviation per dimension",
        "noise_robustness": [{"scale": scale, **accuracy(f"noise_{scale}")} for scale in noise_scales],
        "seed": seed,
    }


def _most_missed(missed, chunks, tokenizer, top=10):
    occurrences = torch.bincount(chunks.reshape(-1), minlength=len(missed))
    ids = [i for i in torch.argsort(missed, descending=True, stable=True)[:top].tolist() if missed[i] > 0]
    return [{"id": i, "piece": tokenizer.id_to_piece(i), "errors": int(missed[i]), "occurrences": int(occurrences[i])}
            for i in ids]


def _numpy_decoder(decode):
    """A torch-in, torch-out wrapper of a numpy decoder such as `runtime.Model.decode`."""
    def decode_tokens(latent):
        return torch.from_numpy(decode(latent.numpy()).astype("int64"))

    return decode_tokens


def _normal(like, generator):
    return torch.randn(like.shape, generator=generator, dtype=like.dtype)
