"""The official CALM computation, written for the tests from a reading of github shaochenze/calm.

Nothing here comes from calm-edge's model code: these modules carry the official parameter names
(`ae_model.encoder.squeeze_layer`, `transformer.layers.0.self_attn.q_proj`, `mlp_generator.mlp_blocks.0.in_ln`,
`embed_proj.3`, ...) and compute what the official `Autoencoder` and `EnergyTransformer` compute, with
Hugging Face's own `LlamaModel` as the backbone, as the official code has it. The tests write random
checkpoints in the released format with them (config.json and weights as .bin, safetensors or
sharded) and compare calm-edge's import, graphs and runtimes with these outputs.
"""
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Tiny dimensions in the released models' proportions (CALM-M: hidden 1024, 16 layers and heads,
# intermediate 2752; the autoencoder 512 / 1280 / latent 128), with the Llama-3 vocabulary.
VOCAB, BOS, EOS, PAD = 128257, 128000, 128001, 128256
AE_DIMS = dict(patch_size=4, hidden_size=32, intermediate_size=48, latent_size=16, num_encoder_layers=2,
               num_decoder_layers=2, vocab_size=VOCAB)
CALM_DIMS = dict(patch_size=4, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, latent_size=16, noise_size=8, num_mlp_layers=2,
                 max_position_embeddings=128, vocab_size=VOCAB)


class RMSNorm(nn.Module):
    def __init__(self, size, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(size)), eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)


class LlamaMLP(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class AELayer(nn.Module):
    def __init__(self, hidden, intermediate):
        super().__init__()
        self.mlp, self.layernorm = LlamaMLP(hidden, intermediate), RMSNorm(hidden)

    def forward(self, x):
        return x + self.mlp(self.layernorm(x))


class Encoder(nn.Module):
    def __init__(self, d):
        super().__init__()
        h, K = d["hidden_size"], d["patch_size"]
        self.K, self.stage = K, d["num_encoder_layers"] // 2
        self.embed_tokens = nn.Embedding(d["vocab_size"], h)
        self.encoder_layers = nn.ModuleList(AELayer(h, d["intermediate_size"]) for _ in range(d["num_encoder_layers"]))
        self.hidden_to_latent = nn.Linear(h, 2 * d["latent_size"])
        self.squeeze_layer = nn.Linear(K * h, h)
        self.norm = RMSNorm(h)

    def forward(self, ids):  # [B, T] -> [B, T / K, 2L]
        batch = ids.shape[0]
        x = self.embed_tokens(ids.reshape(-1, self.K))
        for layer in self.encoder_layers[:self.stage]:
            x = layer(x)
        x = self.squeeze_layer(x.reshape(x.shape[0], 1, -1))
        for layer in self.encoder_layers[self.stage:2 * self.stage]:
            x = layer(x)
        return self.hidden_to_latent(self.norm(x)).reshape(batch, -1, self.hidden_to_latent.out_features)


class Decoder(nn.Module):
    def __init__(self, d):
        super().__init__()
        h, K = d["hidden_size"], d["patch_size"]
        self.K, self.stage = K, d["num_decoder_layers"] // 2
        self.latent_to_hidden = nn.Linear(d["latent_size"], h)
        self.decoder_layers = nn.ModuleList(AELayer(h, d["intermediate_size"]) for _ in range(d["num_decoder_layers"]))
        self.expand_layer = nn.Linear(h, K * h)
        self.norm = RMSNorm(h)

    def forward(self, latents):  # [B, S, L] -> logits [B, S * K, V]
        x = self.latent_to_hidden(latents)
        for layer in self.decoder_layers[:self.stage]:
            x = layer(x)
        x = self.expand_layer(x).reshape(x.shape[0], -1, x.shape[-1])
        for layer in self.decoder_layers[self.stage:2 * self.stage]:
            x = layer(x)
        return F.linear(self.norm(x), self.lm_head_weight)


class Autoencoder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.encoder, self.decoder = Encoder(d), Decoder(d)
        self.decoder.lm_head_weight = self.encoder.embed_tokens.weight  # tied, and saved under both names

    def decode_tokens(self, latents):  # [M, L] -> [M, K]
        return self.decoder(latents[None]).argmax(-1).reshape(latents.shape[0], -1)


class MLPBlock(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.in_ln = nn.LayerNorm(h, eps=1e-6)
        self.linears = nn.Sequential(nn.Linear(2 * h, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, 2 * h))
        self.down_proj = nn.Linear(h, h)

    def forward(self, x, c):
        gate, up = torch.chunk(self.linears(torch.cat([self.in_ln(x), c], dim=-1)), 2, dim=-1)
        return x + self.down_proj(F.silu(gate) * up)


class FinalLayer(nn.Module):
    def __init__(self, h, latent):
        super().__init__()
        self.in_ln = nn.LayerNorm(h, eps=1e-6)
        self.linears = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, latent))

    def forward(self, x):
        return self.linears(self.in_ln(x))


class MLPGenerator(nn.Module):
    def __init__(self, d):
        super().__init__()
        h = d["hidden_size"]
        self.noise_embd, self.hidden_embd = nn.Linear(d["noise_size"], h), nn.Linear(h, h)
        self.norm_hidden, self.norm_noise = nn.LayerNorm(h, eps=1e-6), nn.LayerNorm(h, eps=1e-6)
        self.mlp_blocks = nn.ModuleList(MLPBlock(h) for _ in range(d["num_mlp_layers"]))
        self.final_layer = FinalLayer(h, d["latent_size"])

    def sample(self, hidden, centred_noise):
        """The official `sample`, with its `torch.rand(...) - 0.5` handed in so both sides use one draw."""
        x = self.norm_noise(self.noise_embd(centred_noise))
        c = self.norm_hidden(self.hidden_embd(hidden))
        for block in self.mlp_blocks:
            x = block(x, c)
        return self.final_layer(x)


class EnergyTransformer(nn.Module):
    def __init__(self, d, ae):
        from transformers import LlamaConfig, LlamaModel

        super().__init__()
        h, K = d["hidden_size"], d["patch_size"]
        self.K = K
        self.ae_model = ae
        llama = LlamaConfig(vocab_size=d["vocab_size"], hidden_size=h, intermediate_size=d["intermediate_size"],
                            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
                            num_key_value_heads=d["num_key_value_heads"], max_position_embeddings=d["max_position_embeddings"],
                            rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=PAD, attention_bias=False, mlp_bias=False)
        llama._attn_implementation = "eager"
        self.transformer = LlamaModel(llama)
        self.mlp_generator = MLPGenerator(d)
        self.generative_head = self.mlp_generator  # the official alias: the same module under two names
        self.embed_proj = nn.Sequential(nn.Linear(K * h, 2 * h), nn.SiLU(), nn.Linear(2 * h, h), nn.LayerNorm(h, eps=1e-6))

    def hidden_states(self, ids):
        """Chunk hidden states [B, T / K, H] of ids [B, T] (no mask: purely causal, positions 0.. per chunk)."""
        embeds = self.transformer.embed_tokens(ids).reshape(ids.shape[0], ids.shape[1] // self.K, -1)
        return self.transformer(inputs_embeds=self.embed_proj(embeds)).last_hidden_state


def build(seed=0):
    """An official autoencoder and CALM of the test dimensions, with random weights (biases and LayerNorms too)."""
    torch.manual_seed(seed)
    ae = Autoencoder(AE_DIMS)
    calm = EnergyTransformer(CALM_DIMS, ae)
    with torch.no_grad():
        for name, param in calm.named_parameters():
            if "norm" in name or "in_ln" in name or name.endswith("embed_proj.3.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))  # norms away from the identity, to be tested
            else:
                param.copy_(0.2 * torch.randn_like(param) / max(1, param.shape[-1]) ** 0.5)
    return ae.eval(), calm.eval()


def ae_config(**overrides):
    """The autoencoder's config.json as the official training writes it (`save_pretrained`)."""
    return {"architectures": ["Autoencoder"], "ae_dropout": 0.15, "kl_clamp": 0.5, "kl_weight": 0.001,
            "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 2048, "mlp_bias": False,
            "pretraining_tp": 1, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "torch_dtype": "float32",
            "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, **AE_DIMS, **overrides}


def calm_config(ae_path="/mnt/train/cccczshao/ae_checkpoints/calm-autoencoder", **overrides):
    """The CALM config.json as released: its ae_path is a folder of the training server."""
    return {"architectures": ["EnergyTransformer"], "model_type": "energy", "ae_path": ae_path, "beta": 1.0,
            "num_samples": 8, "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
            "initializer_range": 0.02, "mlp_bias": False, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
            "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
            "use_cache": True, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, **CALM_DIMS,
            **overrides}


def save(state_dict, config, folder, form="bin"):
    """Write a checkpoint folder as the official code's `save_pretrained` would: config.json and the weights
    as pytorch_model.bin (form "bin"), model.safetensors ("safetensors"), or two .bin shards with an index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    if form == "safetensors":
        from safetensors.torch import save_file

        # safetensors refuses shared tensors: save_pretrained drops the aliases first, as here.
        save_file({k: v for k, v in tensors.items() if not k.startswith("generative_head.")
                   and not k.endswith("decoder.lm_head_weight")}, str(folder / "model.safetensors"))
    elif form == "sharded":
        names = sorted(tensors)
        halves = {"pytorch_model-00001-of-00002.bin": names[:len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        weight_map = {}
        for file, keys in halves.items():
            torch.save({k: tensors[k] for k in keys}, folder / file)
            weight_map.update({k: file for k in keys})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(tensors, folder / "pytorch_model.bin")
    return folder
