"""`calm-edge import`: a released CALM model (CALM-M, -L, -XL) and its autoencoder as a calm-edge run.

    import_official("downloads/CALM-M", "downloads/CALM-Autoencoder", out="runs/calm-m")
    import_official("cccczshao/CALM-M", "cccczshao/CALM-Autoencoder", out="runs/calm-m")   # hub ids

The released folders are Hugging Face checkpoints of the official code (github shaochenze/calm):
a `config.json` and weights (`pytorch_model.bin`, `model.safetensors`, or shards with an
`*.index.json`). calm-edge's model code has the official structure as a variant (the config's
`calm.input_projection = "official"`, `calm.energy_head = "official"`, the autoencoder's
`projection_bias`), so the import is a renaming of parameters plus a mapping of the config:

    official                                   calm-edge
    transformer.embed_tokens                   embed_tokens
    transformer.layers.* / transformer.norm    backbone.layers.* / backbone.norm
    embed_proj.*                               input_proj.*
    mlp_generator.* (alias generative_head.*)  energy_head.*
    ae_model.encoder / decoder.*, or the       autoencoder.*: embed, encoder_token_layers,
    autoencoder folder's own encoder / decoder compress (squeeze_layer), encoder_chunk_layers, ...

The official autoencoder's `num_encoder_layers = 2` is one residual layer per token before the
squeeze and one per chunk after it; calm-edge counts one side (1).

The run folder `out` then holds `checkpoints/step_*` (the CALM, its autoencoder riding along as
in every calm-edge CALM checkpoint, the tokenizer with the `[PAD]` token the official training
added), `autoencoder/checkpoints/step_*` (the autoencoder alone, for `eval package`'s
reconstruction) and `import.json` (the sources and their sha256). `export --calm out`,
`generate --checkpoint out` and `eval brierlm --checkpoint out` use it as any calm-edge run.

Checks come first, before any weight is read: the CALM folder's config is the official
`EnergyTransformer`'s, the autoencoder fits it (K, latent size, vocabulary), the tokenizer has
the model's vocabulary. `.bin` files are read with `torch.load(weights_only=True)`: nothing but
tensors is ever unpickled, and a file holding anything else is refused.
"""
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from calm_edge import flops
from calm_edge.config import Config, preset
from calm_edge.errors import CalmEdgeError
from calm_edge.fileio import atomic_output_dir, sha256_of, write_json_atomic
from calm_edge.models.autoencoder import Autoencoder
from calm_edge.models.calm import CalmModel
from calm_edge.tokenizer import HFTokenizer
from calm_edge.training import checkpoint
from calm_edge.training.language_models import SUMMARY_FILE

log = logging.getLogger(__name__)

IMPORT_FILE = "import.json"
CONFIG_FILE = "config.json"
HUB_FILES = ["config.json", "*.bin", "*.safetensors", "*.index.json", "tokenizer*", "special_tokens_map.json"]
PAD_TOKEN = "[PAD]"  # the token the official training scripts add to the Llama-3 tokenizer


# ----- finding and reading the released folders ------------------------------------------------


def resolve_folder(path_or_id, what, option):
    """A local folder, or a Hugging Face hub id resolved through huggingface_hub (its cache, HF_HUB_OFFLINE)."""
    path = Path(str(path_or_id)).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_id)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CalmEdgeError(f"{what} {text} is not a folder; pass {option} with the downloaded folder or a "
                            "Hugging Face id such as cccczshao/CALM-M")
    from huggingface_hub import snapshot_download  # optional: only hub ids need it

    # The environment read now, not when huggingface_hub was imported: HF_HUB_CACHE and HF_HUB_OFFLINE.
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(text, allow_patterns=HUB_FILES, cache_dir=os.environ.get("HF_HUB_CACHE"),
                                      local_files_only=offline))
    except Exception as e:  # huggingface_hub raises many types: offline, not cached, no such repo, network
        raise CalmEdgeError(f"{what} {text} cannot be fetched ({type(e).__name__}: {str(e).splitlines()[0]}); "
                            f"download it (huggingface-cli download {text}) and pass its folder with {option}, or "
                            "allow the network (HF_HUB_OFFLINE unset)") from None


def read_config(folder, what):
    path = Path(folder) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CalmEdgeError(f"{path} not found: {folder} is not a Hugging Face checkpoint folder of the {what}") from None
    except (OSError, ValueError) as e:
        raise CalmEdgeError(f"{path} cannot be read as JSON ({e}); download the {what} again") from None
    if not isinstance(data, dict):
        raise CalmEdgeError(f"{path} holds no config object; download the {what} again")
    return data


def _need(config, path, keys):
    missing = [key for key in keys if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool)]
    if missing:
        raise CalmEdgeError(f"{path} lacks {', '.join(missing)} (or gives them as non-numbers); it is not a released "
                            "CALM config, download it again")


CALM_KEYS = ("patch_size", "latent_size", "noise_size", "num_mlp_layers", "vocab_size", "hidden_size",
             "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
             "pad_token_id", "bos_token_id", "eos_token_id")
AE_KEYS = ("patch_size", "latent_size", "vocab_size", "hidden_size", "intermediate_size", "num_encoder_layers",
           "num_decoder_layers")


def check_configs(calm, calm_path, ae, ae_path):
    """The CALM config is the official EnergyTransformer's and the autoencoder fits it; else one error naming both."""
    architectures = calm.get("architectures") or []
    if "EnergyTransformer" not in architectures or calm.get("model_type", "energy") != "energy":
        raise CalmEdgeError(f"{calm_path} describes {architectures or calm.get('model_type')}, not the official CALM "
                            "(EnergyTransformer with the energy head); pass a CALM-M, CALM-L or CALM-XL folder with --calm")
    if "Autoencoder" not in (ae.get("architectures") or []):
        raise CalmEdgeError(f"{ae_path} describes {ae.get('architectures')}, not the CALM autoencoder; pass the "
                            "CALM-Autoencoder folder with --autoencoder")
    _need(calm, calm_path, CALM_KEYS)
    _need(ae, ae_path, AE_KEYS)
    for key in ("patch_size", "latent_size", "vocab_size"):
        if calm[key] != ae[key]:
            raise CalmEdgeError(f"the autoencoder {ae_path} has {key} {ae[key]}, the CALM model {calm_path} {calm[key]}; "
                                "pass the autoencoder this CALM model was trained with (--autoencoder)")
    if ae.get("rms_norm_eps", 1e-6) != 1e-6:
        raise CalmEdgeError(f"{ae_path} has rms_norm_eps {ae['rms_norm_eps']}; calm-edge's autoencoder uses 1e-6")
    for config, path in ((calm, calm_path), (ae, ae_path)):
        if config.get("hidden_act", "silu") != "silu":
            raise CalmEdgeError(f"{path} uses the activation {config['hidden_act']!r}; the official CALM models use silu")
    if ae["num_encoder_layers"] % 2 or ae["num_decoder_layers"] % 2:
        raise CalmEdgeError(f"{ae_path} has {ae['num_encoder_layers']} encoder / {ae['num_decoder_layers']} decoder "
                            "layers; the official autoencoder uses an even number (half before, half after the "
                            "chunk projection), and calm-edge imports only those")
    if calm["hidden_size"] % calm["num_attention_heads"]:
        raise CalmEdgeError(f"{calm_path}: hidden_size {calm['hidden_size']} is not a multiple of num_attention_heads")
    if (calm.get("rope_scaling") or None) is not None:
        raise CalmEdgeError(f"{calm_path} sets rope_scaling {calm['rope_scaling']}; calm-edge supports the released "
                            "models' plain rotary embeddings only")


def calm_edge_config(calm, ae):
    """The calm-edge Config of an official CALM model and autoencoder (their config.json dicts)."""
    heads = calm["num_attention_heads"]
    overrides = {
        "tokenizer": {"kind": "hf-bpe", "vocab_size": calm["vocab_size"], "pad_id": calm["pad_token_id"],
                      "bos_id": calm["bos_token_id"], "eos_id": calm["eos_token_id"], "unk_id": -1},
        "autoencoder": {"chunk_size": ae["patch_size"], "hidden_size": ae["hidden_size"],
                        "latent_size": ae["latent_size"], "intermediate_size": ae["intermediate_size"],
                        "num_encoder_layers": ae["num_encoder_layers"] // 2,
                        "num_decoder_layers": ae["num_decoder_layers"] // 2, "projection_bias": True,
                        "kl_clamp": float(ae.get("kl_clamp", 0.5)), "kl_weight": float(ae.get("kl_weight", 1e-3)),
                        "latent_dropout": float(ae.get("ae_dropout", 0.15)),
                        "token_mask_prob": float(ae.get("ae_dropout", 0.15))},
        "calm": {"backbone": {"hidden_size": calm["hidden_size"], "intermediate_size": calm["intermediate_size"],
                              "num_layers": calm["num_hidden_layers"], "num_heads": heads,
                              "num_kv_heads": calm.get("num_key_value_heads") or heads,
                              "rope_theta": float(calm.get("rope_theta", 10000.0)),
                              "rms_norm_eps": float(calm.get("rms_norm_eps", 1e-6)),
                              "max_positions": calm["max_position_embeddings"]},
                 "noise_size": calm["noise_size"], "energy_head_layers": calm["num_mlp_layers"],
                 "input_projection": "official", "energy_head": "official", "prompt_fill": "right-pad",
                 "num_model_samples": int(calm.get("num_samples", 8)), "energy_beta": float(calm.get("beta", 1.0))},
    }
    # Training windows must be whole chunks of the imported K; the official ones were 8192 tokens.
    train = {"seq_len": 8192 - 8192 % ae["patch_size"] or ae["patch_size"]}
    overrides.update({section: train for section in ("train_autoencoder", "train_calm", "train_ar")})
    return Config.from_dict(overrides, base=preset("base"))


def load_weights(folder, what):
    """Every tensor of a checkpoint folder: safetensors, pytorch_model.bin or shards with an index, read safely."""
    folder = Path(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CalmEdgeError(f"{index} is not a shard index ({e}); download the {what} again") from None
            tensors = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(_read_weights_file(folder / shard, what))
            missing = sorted(set(weight_map) - set(tensors))
            if missing:
                raise CalmEdgeError(f"{index} lists {missing[0]} (and {len(missing) - 1} more) that no shard holds; "
                                    f"download the {what} again")
            return tensors
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _read_weights_file(folder / name, what)
    raise CalmEdgeError(f"{folder} holds no weights (model.safetensors, pytorch_model.bin or a shard index); "
                        f"download the {what} again")


def _read_weights_file(path, what):
    if not path.is_file():
        raise CalmEdgeError(f"{path} is missing; download the {what} again")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CalmEdgeError(f"{path} is not a readable safetensors file ({e}); download the {what} again") from None
    try:
        # weights_only: only tensors and plain containers are unpickled, never code or other objects.
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle and torch raise many types for a hostile or damaged file
        raise CalmEdgeError(f"{path} holds something other than tensors, or is damaged ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); calm-edge loads only weights, refused") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CalmEdgeError(f"{path} is not a state dict of named tensors; calm-edge loads only weights, refused")
    return data


# ----- renaming --------------------------------------------------------------------------------


def _residual_layer(source, target):
    """One official AELayer (LlamaMLP + RMSNorm) onto a calm-edge ResidualMLP."""
    return {f"{source}.mlp.gate_proj.weight": f"{target}.gate.weight", f"{source}.mlp.up_proj.weight": f"{target}.up.weight",
            f"{source}.mlp.down_proj.weight": f"{target}.down.weight", f"{source}.layernorm.weight": f"{target}.norm.weight"}


def autoencoder_names(ae, prefix=""):
    """{official name: calm-edge Autoencoder name} for an official autoencoder config (names under `prefix`)."""
    names = {"encoder.embed_tokens.weight": "embed.weight",
             "encoder.squeeze_layer.weight": "compress.weight", "encoder.squeeze_layer.bias": "compress.bias",
             "encoder.norm.weight": "encoder_norm.weight", "encoder.hidden_to_latent.weight": "to_latent.weight",
             "encoder.hidden_to_latent.bias": "to_latent.bias",
             "decoder.latent_to_hidden.weight": "from_latent.weight", "decoder.latent_to_hidden.bias": "from_latent.bias",
             "decoder.expand_layer.weight": "expand.weight", "decoder.expand_layer.bias": "expand.bias",
             "decoder.norm.weight": "decoder_norm.weight"}
    stage = ae["num_encoder_layers"] // 2
    for i in range(stage):
        names.update(_residual_layer(f"encoder.encoder_layers.{i}", f"encoder_token_layers.{i}"))
        names.update(_residual_layer(f"encoder.encoder_layers.{stage + i}", f"encoder_chunk_layers.{i}"))
    stage = ae["num_decoder_layers"] // 2
    for i in range(stage):
        names.update(_residual_layer(f"decoder.decoder_layers.{i}", f"decoder_chunk_layers.{i}"))
        names.update(_residual_layer(f"decoder.decoder_layers.{stage + i}", f"decoder_token_layers.{i}"))
    return {prefix + official: ours for official, ours in names.items()}


def rename(tensors, names, source):
    """The tensors under calm-edge's names; every name must be there (`source` names the file in errors)."""
    missing = [official for official in names if official not in tensors]
    if missing:
        raise CalmEdgeError(f"{source} lacks {missing[0]} (and {len(missing) - 1} more of the official names); it is not "
                            "a released CALM checkpoint of this config, or it is incomplete")
    return {ours: tensors[official] for official, ours in names.items()}


def _check_alias(tensors, a, b, source):
    if b in tensors and a in tensors and not torch.equal(tensors[a], tensors[b]):
        raise CalmEdgeError(f"{source}: {a} and {b} should be one tensor (the official code ties them) but differ; "
                            "the checkpoint is damaged")


def calm_names(tensors, calm):
    """{official name: calm-edge CalmModel name} for the CALM model (without its autoencoder)."""
    head = "mlp_generator." if any(k.startswith("mlp_generator.") for k in tensors) else "generative_head."
    names = {}
    for name in tensors:
        if name.startswith("transformer.embed_tokens."):
            names[name] = name[len("transformer."):]
        elif name.startswith(("transformer.layers.", "transformer.norm.")):
            names[name] = "backbone." + name[len("transformer."):]
        elif name.startswith("embed_proj."):
            names[name] = "input_proj." + name[len("embed_proj."):]
        elif name.startswith(head):
            names[name] = "energy_head." + name[len(head):]
    return names


# ----- the import ------------------------------------------------------------------------------


def import_official(calm, autoencoder=None, tokenizer=None, out="runs/calm-official", force=False):
    """Import the official CALM `calm` with its `autoencoder` (folders or hub ids) into the run folder `out`."""
    out = Path(out)
    inputs = {"--calm": calm, "--autoencoder": autoencoder, "--tokenizer": tokenizer}
    with atomic_output_dir(out, force=force, what="imported run", inputs=inputs) as tmp:  # refuses an existing `out` first
        calm_folder = resolve_folder(calm, "CALM model", "--calm")
        calm_config = read_config(calm_folder, "CALM model")
        if autoencoder is None:
            recorded = calm_config.get("ae_path")
            if not recorded or not Path(str(recorded)).is_dir():
                raise CalmEdgeError(f"the autoencoder folder {recorded!r} that {calm_folder / CONFIG_FILE} names (its "
                                    "ae_path, a folder of the training server) does not exist here; pass --autoencoder "
                                    "with the CALM-Autoencoder folder or id (cccczshao/CALM-Autoencoder)")
            autoencoder = recorded
        ae_folder = resolve_folder(autoencoder, "autoencoder", "--autoencoder")
        ae_config = read_config(ae_folder, "autoencoder")
        check_configs(calm_config, calm_folder / CONFIG_FILE, ae_config, ae_folder / CONFIG_FILE)
        config = calm_edge_config(calm_config, ae_config)
        tokenizer_folder = _tokenizer_folder(calm_folder, tokenizer)
        hf_tokenizer = _model_tokenizer(tokenizer_folder, config)  # checked before the weights are read

        calm_tensors = load_weights(calm_folder, "CALM model")
        _check_alias(calm_tensors, "mlp_generator.noise_embd.weight", "generative_head.noise_embd.weight", calm_folder)
        ours = rename(calm_tensors, calm_names(calm_tensors, calm_config), calm_folder)
        # The autoencoder rides along in the official CALM checkpoint as ae_model.*; the folder's own is the fallback.
        if any(k.startswith("ae_model.") for k in calm_tensors):
            ae_tensors, ae_prefix, ae_source = calm_tensors, "ae_model.", calm_folder
        else:
            ae_tensors, ae_prefix, ae_source = load_weights(ae_folder, "autoencoder"), "", ae_folder
        _check_alias(ae_tensors, f"{ae_prefix}encoder.embed_tokens.weight", f"{ae_prefix}decoder.lm_head_weight",
                     ae_source)
        ae_weights = rename(ae_tensors, autoencoder_names(ae_config, ae_prefix), ae_source)
        ours.update({f"autoencoder.{name}": tensor for name, tensor in ae_weights.items()})
        model = _assemble(CalmModel, config, ours, calm_folder)
        ae_model = _assemble(Autoencoder, config, ae_weights, ae_source)

        source_files = {"calm": _describe(calm, calm_folder), "autoencoder": _describe(autoencoder, ae_folder),
                        "tokenizer": str(tokenizer_folder)}
        info = {"imported": source_files, "official_config": calm_config, "tokens_seen": None, "data": None}
        token_file = tmp / "tokenizer.json"
        hf_tokenizer.save(token_file)
        files = {"tokenizer.json": token_file}
        step = int(calm_config.get("global_step", 0))
        ae_saved = checkpoint.save_checkpoint(tmp / "autoencoder", step, "autoencoder", config, ae_model,
                                              {**info, "official_config": ae_config}, {}, files=files)
        saved = checkpoint.save_checkpoint(tmp, step, "calm", config, model, info, {}, files=files)
        token_file.unlink()
        summary = {"run": str(out), "checkpoint": str(out / saved.relative_to(tmp)), "sources": source_files,
                   "parameters": model.num_parameters(), "autoencoder_parameters": ae_model.num_parameters(),
                   "config": config.to_dict()}
        write_json_atomic(tmp / IMPORT_FILE, summary)
        # What a trained run's summary says, so that export's provenance names the autoencoder (for
        # `eval package`'s reconstruction) and the model's size.
        write_json_atomic(tmp / SUMMARY_FILE, {
            "kind": "calm", "step": step, "imported": source_files, **flops.summary(config, "calm"),
            "autoencoder": {"checkpoint": str(out / ae_saved.relative_to(tmp)), "step": step}})
    return summary


def _describe(given, folder):
    files = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    return {"given": str(given), "folder": str(folder),
            "sha256": {name: sha256_of(Path(folder) / name) for name in files if name.endswith((".json", ".bin",
                                                                                              ".safetensors"))}}


def _assemble(cls, config, tensors, source):
    """`cls(config)` holding `tensors` (assigned, not copied: a 1.8 B-parameter model fits in memory once)."""
    with torch.device("meta"):
        model = cls(config)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise CalmEdgeError(f"the weights of {source} do not fit the model its config describes "
                            f"({' '.join(str(e).strip().splitlines()[:2])[:300]}); download the checkpoint again") from None
    return model.float().eval()


def _tokenizer_folder(calm_folder, tokenizer):
    if tokenizer is not None:
        return resolve_folder(tokenizer, "tokenizer", "--tokenizer")
    if (calm_folder / "tokenizer.json").is_file():
        return calm_folder
    raise CalmEdgeError(f"{calm_folder} holds no tokenizer.json; pass --tokenizer with the Llama-3 tokenizer folder "
                        "(../shared/data/llama3-tokenizer, or meta-llama/Meta-Llama-3-8B)")


def _model_tokenizer(folder, config):
    """The Hugging Face tokenizer with the model's vocabulary: the Llama-3 one plus the [PAD] the training added."""
    tok = HFTokenizer(folder)
    vocab, pad = config.tokenizer.vocab_size, config.tokenizer.pad_id
    if tok.vocab_size == vocab - 1 and pad == vocab - 1:
        tok.add_special_token(PAD_TOKEN)
    if tok.vocab_size != vocab or tok.token_to_id(PAD_TOKEN) not in (None, pad):
        raise CalmEdgeError(f"the tokenizer {tok.path} has {tok.vocab_size} tokens, the model {vocab} (pad {pad}); pass "
                            "--tokenizer with the tokenizer the model was trained with (Llama-3)")
    for name in ("bos_id", "eos_id"):
        if not 0 <= getattr(config.tokenizer, name) < tok.vocab_size:
            raise CalmEdgeError(f"the model's {name} is outside the tokenizer {tok.path}; pass the Llama-3 tokenizer")
    return tok
