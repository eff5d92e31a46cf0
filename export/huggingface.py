"""`calm-edge export --ar DIR --format hf`: the AR baseline as a Hugging Face Llama checkpoint.

The baseline's backbone is Llama to the letter (RMSNorm, half-split rotary positions, grouped KV
heads, SwiGLU, untied output head) and its parameters carry Llama's names, so the checkpoint
is a renaming of the state dict plus Llama's config.json. Peer runtimes (optimum's ONNX export,
onnxruntime-genai's model builder) then run the very same weights as calm-edge's own runtime,
which is what makes the benchmark comparisons fair.

Written files: config.json, generation_config.json, model.safetensors, tokenizer.model and
tokenizer_config.json (a slow LlamaTokenizer over our SentencePiece model: no bos/eos added,
no prefix space; it encodes text exactly as calm-edge's tokenizer does, except that calm-edge
spells a literal U+2581 character as bytes while the Llama tokenizer reads it as a space).

Validation, inside the temporary folder before it replaces `out`: transformers loads the folder
as LlamaForCausalLM; its logits on random and on real token ids must match the PyTorch
baseline's within 1e-4 (relative to the logits' scale), and its tokenizer must encode real text
to the same ids.
"""
import json
import shutil

import torch
from safetensors.torch import save_file

from calm_edge.errors import CalmEdgeError
from calm_edge.fileio import atomic_output_dir
from calm_edge.training.language_models import load_language_model

LOGITS_TOLERANCE = 1e-4
SAMPLE_TEXTS = (
    "The history of the city begins in 1204, when the river was first bridged.",
    " Its population  grew to 12,000 by 1850.\n\nSee also: list of bridges — and café naïve 東京.",
)


def llama_config(config):
    """Hugging Face LlamaConfig fields for the AR baseline of `config`."""
    bb, tok = config.ar.backbone, config.tokenizer
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": tok.vocab_size,
        "hidden_size": bb.hidden_size,
        "intermediate_size": bb.intermediate_size,
        "num_hidden_layers": bb.num_layers,
        "num_attention_heads": bb.num_heads,
        "num_key_value_heads": bb.num_kv_heads,
        "head_dim": bb.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": bb.max_positions,
        "rms_norm_eps": bb.rms_norm_eps,
        "rope_theta": bb.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "torch_dtype": "float32",
    }


def llama_state_dict(model):
    """Our AR state dict under Llama's names: `backbone.*` becomes `model.*`."""
    renamed = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("backbone."):
            name = "model." + name[len("backbone."):]
        elif name.startswith("embed_tokens."):
            name = "model." + name
        renamed[name] = tensor.detach().contiguous().clone()
    return renamed


def tokenizer_config(tok, max_positions, pieces):
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": True,
        "model_max_length": max_positions,
        "pad_token": pieces[tok.pad_id],
        "bos_token": pieces[tok.bos_id],
        "eos_token": pieces[tok.eos_id],
        "unk_token": pieces[tok.unk_id],
    }


def fast_tokenizer_config(tokenizer, max_positions):
    """tokenizer_config.json for a Hugging Face tokenizer.json (a model with the Llama-3 tokenizer)."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_positions,
            "bos_token": tokenizer.id_to_piece(tokenizer.bos_id), "eos_token": tokenizer.id_to_piece(tokenizer.eos_id),
            "pad_token": tokenizer.id_to_piece(tokenizer.pad_id), "clean_up_tokenization_spaces": False}


def export_hf(checkpoint, out, force=False, real_texts=SAMPLE_TEXTS):
    """Write the AR checkpoint at `checkpoint` as a Hugging Face Llama folder `out`; returns the report."""
    model, saved = load_language_model(checkpoint)
    if saved.kind != "ar":
        raise CalmEdgeError(
            f"{saved.folder} holds a {saved.kind} checkpoint; --format hf writes the token-by-token baseline "
            "only (a Llama model), pass an `calm-edge train ar` run with --ar"
        )
    tokenizer = saved.tokenizer()
    with atomic_output_dir(out, force=force, what="Hugging Face checkpoint", inputs={"--ar": checkpoint}) as tmp:
        config = saved.config
        (tmp / "config.json").write_text(json.dumps(llama_config(config), indent=2) + "\n")
        generation = {"bos_token_id": config.tokenizer.bos_id, "eos_token_id": config.tokenizer.eos_id,
                      "pad_token_id": config.tokenizer.pad_id, "do_sample": True, "temperature": 1.0, "top_k": 0}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        save_file(llama_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer.kind == "hf-bpe":  # the tokenizer.json as it is, for the fast tokenizer
            shutil.copyfile(saved.tokenizer_path, tmp / "tokenizer.json")
            settings = fast_tokenizer_config(tokenizer, config.ar.backbone.max_positions)
        else:
            shutil.copyfile(saved.tokenizer_path, tmp / "tokenizer.model")
            pieces = [tokenizer.id_to_piece(i) for i in range(4)]
            settings = tokenizer_config(config.tokenizer, config.ar.backbone.max_positions, pieces)
        (tmp / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")
        report = validate_hf(model, tokenizer, tmp, real_texts)
        (tmp / "calm_edge_export.json").write_text(json.dumps(
            {"source_checkpoint": str(saved.folder), "step": saved.trainer.get("step"), "validation": report},
            indent=2) + "\n")
    return report


def validate_hf(model, tokenizer, folder, real_texts):
    """Load `folder` with transformers and compare logits and tokenization with ours."""
    try:  # transformers is an optional dependency (the bench extra)
        from transformers import AutoTokenizer, LlamaForCausalLM
    except ImportError:
        raise CalmEdgeError(
            "--format hf validates the checkpoint with transformers, which is not installed; "
            "pip install 'calm-edge[bench]' (or transformers)"
        ) from None
    theirs = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))

    report = {"logits": {}, "tokenizer": {}}
    generator = torch.Generator().manual_seed(0)
    cases = {"random": torch.randint(4, model.config.tokenizer.vocab_size, (2, 48), generator=generator)}
    real = [tokenizer.encode(text) for text in real_texts]
    width = min(len(ids) for ids in real)
    cases["real"] = torch.tensor([ids[:width] for ids in real])
    with torch.no_grad():
        for name, ids in cases.items():
            ours, _ = model.logits(ids)
            reference = theirs(input_ids=ids).logits
            diff = (ours - reference).abs().max().item()
            scale = max(1.0, reference.abs().max().item())
            report["logits"][name] = {"max_abs_diff": diff, "scale": scale}
            if diff > LOGITS_TOLERANCE * scale:
                raise CalmEdgeError(
                    f"the Hugging Face checkpoint's logits differ from the baseline's by {diff:.3g} on {name} "
                    f"inputs (tolerance {LOGITS_TOLERANCE * scale:.3g}); the Llama mapping is broken, nothing was written"
                )
    for i, text in enumerate(real_texts):
        same = hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text)
        report["tokenizer"][f"text_{i}"] = same
        if not same:
            raise CalmEdgeError(f"the Hugging Face tokenizer encodes sample text {i} differently from calm-edge's; "
                                "nothing was written")
    return report
