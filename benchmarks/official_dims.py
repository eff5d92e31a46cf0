"""Benchmark: the released CALM models' sizes (random weights in the official format) through the whole toolchain.

    python benchmarks/official_dims.py --sizes M,L,XL        # -> benchmarks/results/official_dims.json

For each size: a random CALM checkpoint and its autoencoder written as the official training saves
them (config.json, pytorch_model.bin, shards over 5 GB as `save_pretrained` makes them; the
parameter names of the official code), then, each command in a process of its own under GNU time
(wall seconds and peak resident memory):

    calm-edge import    the official folders -> a calm-edge run
    calm-edge export    the run -> a package (graphs over 2 GB with external data), validated
    calm-edge quantize  the package -> int4

and the package sizes. Then `calm-edge bench` at batch 1, 2 threads, a 64-token prompt and 256 new
tokens, T = 1, measures decode tokens/s of the fp32 and int4 packages of the sizes in `--bench`
beside calm-edge's own AR at Transformer-S dimensions (the `base` preset's AR, random weights) with the
same Llama-3 tokenizer, and onnxruntime-genai running those AR weights, on the same prompt ids.

The released configs were not available here: CALM-M's dimensions are the official training
script's; CALM-L's and CALM-XL's are assumed (hidden 1536 / 2560, intermediate 4096 / 6880, 16
layers), chosen to give the released parameter counts (735 M, 1.82 B).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from calm_edge.config import preset
from calm_edge.export.random_weights import random_checkpoint
from calm_edge.fileio import write_json_atomic
from calm_edge.models.calm import CalmModel
from calm_edge.training.official import autoencoder_names, calm_edge_config

REPO = Path(__file__).resolve().parent.parent
VOCAB, BOS, EOS, PAD = 128257, 128000, 128001, 128256
AE = dict(patch_size=4, hidden_size=512, intermediate_size=1280, latent_size=128, num_encoder_layers=2,
          num_decoder_layers=2, vocab_size=VOCAB, rms_norm_eps=1e-6)
SIZES = {  # hidden, intermediate, layers, heads
    "M": (1024, 2752, 16, 16),
    "L": (1536, 4096, 16, 16),
    "XL": (2560, 6880, 16, 20),
}
SHARD_BYTES = 5 * 10 ** 9  # transformers' default max_shard_size, "5GB"


def official_configs(size):
    hidden, intermediate, layers, heads = SIZES[size]
    calm = {"architectures": ["EnergyTransformer"], "model_type": "energy", "ae_path": "/mnt/train/ae", "patch_size": 4,
            "latent_size": 128, "noise_size": 64, "num_mlp_layers": 4, "num_samples": 8, "beta": 1.0,
            "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
            "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "torch_dtype": "float32"}
    ae = {"architectures": ["Autoencoder"], "ae_dropout": 0.15, "kl_clamp": 0.5, "kl_weight": 1e-3, "hidden_act": "silu",
          "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, **AE}
    return calm, ae


def official_state_dicts(model, ae_config):
    """calm-edge's CALM module under the official names: (CALM checkpoint tensors, autoencoder tensors)."""
    ours = model.state_dict()
    to_official = {v: k for k, v in autoencoder_names(ae_config).items()}
    ae = {to_official[name[len("autoencoder."):]]: t for name, t in ours.items() if name.startswith("autoencoder.")}
    ae["decoder.lm_head_weight"] = ae["encoder.embed_tokens.weight"]  # the official tie, saved under both names
    calm = {f"ae_model.{k}": v for k, v in ae.items()}
    for name, tensor in ours.items():
        if name.startswith("embed_tokens."):
            calm["transformer." + name] = tensor
        elif name.startswith("backbone."):
            calm["transformer." + name[len("backbone."):]] = tensor
        elif name.startswith("input_proj."):
            calm["embed_proj." + name[len("input_proj."):]] = tensor
        elif name.startswith("energy_head."):
            calm["mlp_generator." + name[len("energy_head."):]] = tensor
            calm["generative_head." + name[len("energy_head."):]] = tensor  # the official alias
    return calm, ae


def save_official(tensors, config, folder):
    """config.json and pytorch_model.bin, or shards with an index past SHARD_BYTES, as save_pretrained writes."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name], size = tensor, size + nbytes
    shards.append(current)
    if len(shards) == 1:
        torch.save(shards[0], folder / "pytorch_model.bin")
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(shard, folder / file)
        weight_map.update({name: file for name in shard})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def timed(command, log):
    """(seconds, peak resident MB) of one command, run under GNU time in a process of its own."""
    stats = log.with_suffix(".time")
    with open(log, "w") as out:
        done = subprocess.run(["/usr/bin/time", "-o", str(stats), "-f", "%e %M", *command], stdout=out, stderr=out)
    seconds, kib = stats.read_text().split()[-2:]
    result = {"seconds": round(float(seconds), 1), "peak_rss_mb": round(int(kib) * 1024 / 1e6), "command": " ".join(command)}
    if done.returncode != 0:  # recorded, with the log's last line, and the size's remaining steps skipped
        lines = log.read_text(errors="replace").strip().splitlines()
        result["failed"] = {"returncode": done.returncode, "last_line": lines[-1] if lines else ""}
        print(f"{' '.join(command)} failed ({done.returncode}); see {log}", file=sys.stderr)
    return result


def folder_mb(folder):
    return round(sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file()) / 1e6, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="M,L,XL")
    parser.add_argument("--bench", default="M,L", help="Sizes whose decode speed is measured.")
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "llama3-tokenizer"))
    parser.add_argument("--work", default=str(REPO / "bench-work" / "official"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "official_dims.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "calm_edge.cli", "-q"]
    report = {"benchmark": "official_dims", "command": " ".join(["python", "benchmarks/official_dims.py", *sys.argv[1:]]),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"cpu_cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)},
              "weights": "random, in the official format (tests/official_calm.py reads the format; see this script)",
              "dimensions": {size: dict(zip(("hidden", "intermediate", "layers", "heads"), SIZES[size]))
                             for size in SIZES},
              "sizes": {}}
    for size in args.sizes.split(","):
        folder = work / size
        calm_config, ae_config = official_configs(size)
        if not (folder / "official" / "CALM" / "config.json").is_file():
            torch.manual_seed(0)
            model = CalmModel(calm_edge_config(calm_config, ae_config)).eval()
            calm_tensors, ae_tensors = official_state_dicts(model, ae_config)
            save_official(calm_tensors, calm_config, folder / "official" / "CALM")
            save_official(ae_tensors, ae_config, folder / "official" / "CALM-Autoencoder")
            del model, calm_tensors, ae_tensors
        entry = {"parameters": None, "official_files_mb": folder_mb(folder / "official" / "CALM")}
        run, package, int4 = folder / "run", folder / f"calm-{size}", folder / f"calm-{size}-int4"
        entry["import"] = timed([*cli, "import", "--calm", str(folder / "official" / "CALM"), "--autoencoder",
                                 str(folder / "official" / "CALM-Autoencoder"), "--tokenizer", args.tokenizer,
                                 "--out", str(run), "--force"], folder / "import.log")
        report["sizes"][size] = entry
        if "failed" in entry["import"]:
            continue
        entry["parameters"] = json.loads((run / "import.json").read_text())["parameters"]
        entry["export"] = timed([*cli, "export", "--calm", str(run), "--out", str(package), "--force"],
                                folder / "export.log")
        if "failed" in entry["export"]:
            continue
        entry["quantize_int4"] = timed([*cli, "quantize", "--package", str(package), "--mode", "int4", "--out",
                                        str(int4), "--force"], folder / "quantize.log")
        if "failed" in entry["quantize_int4"]:
            continue
        manifest = json.loads((package / "manifest.json").read_text())
        entry["package_mb"] = {"fp32": folder_mb(package), "int4": folder_mb(int4)}
        entry["external_data"] = {name: "external_data" in g for name, g in manifest["graphs"].items()}
        entry["validation"] = manifest["validation"]["end_to_end"]
        print(size, json.dumps(entry), flush=True)
        write_json_atomic(args.out, report)

    # calm-edge's AR at Transformer-S dimensions with the same tokenizer, as a package and as a Hugging
    # Face folder for onnxruntime-genai.
    ar = work / "ar-transformer-s"
    tokenizer = next((work / args.sizes.split(",")[0] / "run" / "checkpoints").iterdir()) / "tokenizer.json"
    base = preset("base")
    config = base.with_overrides(["tokenizer.kind=hf-bpe", f"tokenizer.vocab_size={VOCAB}", f"tokenizer.pad_id={PAD}",
                                  f"tokenizer.bos_id={BOS}", f"tokenizer.eos_id={EOS}", "tokenizer.unk_id=-1"])
    ar_package, ar_int4 = ar / "ar-transformer-s", ar / "ar-transformer-s-int4"
    if not (ar_int4 / "manifest.json").is_file():
        random_checkpoint(config, "ar", tokenizer, ar / "run", force=True)
        report["ar_export"] = timed([*cli, "export", "--ar", str(ar / "run"), "--out", str(ar_package), "--force"],
                                    ar / "export.log")
        timed([*cli, "export", "--ar", str(ar / "run"), "--format", "hf", "--out", str(ar / "hf"), "--force"],
              ar / "export-hf.log")
        timed([*cli, "quantize", "--package", str(ar_package), "--mode", "int4", "--out", str(ar_int4), "--force"],
              ar / "quantize.log")
    packages = [arg for size in args.bench.split(",") if "package_mb" in report["sizes"].get(size, {})
                for arg in ("--package", str(work / size / f"calm-{size}"), "--package", str(work / size / f"calm-{size}-int4"))]
    bench_out = work / "bench.json"
    report["bench_command"] = " ".join([
        "calm-edge", "bench", *packages, "--package", str(ar_package), "--package", str(ar_int4),
        "--hf", str(ar / "hf"), "--peer", "ort-genai", "--work-dir", str(work / "peers"), "--prompt-lengths", "64",
        "--batch-sizes", "1", "--threads", "2", "--temperatures", "1", "--new-tokens", "256", "--repeats",
        str(args.repeats), "--rounds", str(args.rounds), "--out", str(bench_out)])
    subprocess.run([*cli, *report["bench_command"].split()[1:]], check=True)
    bench = json.loads(bench_out.read_text())
    report["decode"] = [{"runner": r["name"], "quantization": r.get("quantization"), "status": r["status"],
                         "decode_tokens_per_s": {k: c["decode_tokens_per_s"]["median"] for k, c in r["cells"].items()
                                                 if "decode_tokens_per_s" in c},
                         "ms_per_token": {k: c["token_ms"]["median"] for k, c in r["cells"].items() if "token_ms" in c},
                         "model_mb": r.get("package_size_mb")} for r in bench["runners"]]
    report["ratios"] = [{k: r.get(k) for k in ("calm", "ar", "cell", "ratio", "ideal_ratio", "ratio_by_round")}
                        for r in bench["comparisons"]]
    write_json_atomic(args.out, report)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
