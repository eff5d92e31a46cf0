"""Benchmark: a CALM and an AR package in every quantization mode, quality against CPU decode speed.

Runs through the CLI, exactly as a user would, into runs/quant_<name>/ (git-ignored):

    calm-edge quantize --package CALM_PKG --mode MODE --out runs/quant_<name>/calm-MODE \
        [--calibration-data VALID]                      (every mode; int8-static calibrates on VALID)
    calm-edge quantize ... --keep-fp32 decoder          (CALM, every mode: is the decoder the sensitive graph?)
    (the same for AR_PKG)
    calm-edge eval compare CALM_PKG AR_PKG runs/quant_<name>/* --data TEST --autoencoder AE \
        --out benchmarks/results/quantization_<name>.json --plot benchmarks/results/quantization_<name>.png

For the `small` models, once they are trained and exported:

    python benchmarks/quantization.py --name small --calm packages/calm-small --ar packages/ar-small \
        --autoencoder runs/ae_small --calibration-data ../shared/data/wiki-valid.jsonl \
        --data ../shared/data/wikitext103-test-doc.jsonl --detokenize wikitext

Quantized packages already in runs/quant_<name>/ are reused unless --requantize. The result
JSON holds the commands, the table (each figure absolute and relative to the fp32 package of
the same kind, measured in the same run) and, per kind, the fastest mode within the
goal (at least 1.5x decode speed, at most 3% BrierLM lost), if any.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from calm_edge.fileio import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
MODES = ("int8-dynamic", "int8-static", "fp16", "int4")
# Quality: relative BrierLM, or where the fp32 BrierLM is 0 the paired Brier-1 (see
# calm_edge.evaluation.compare.quality_relative_to_fp32). "established" asks the estimate minus two
# standard errors to clear the bar too, so that sampling luck cannot pass a mode.
GOAL = {"decode_speedup_at_least": 1.5, "quality_relative_at_least": 0.97}


def run(command):
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True)
    return round(time.perf_counter() - started, 2)


def quantize_all(kind, fp32, work, calibration, requantize, keep_decoder):
    """Quantized packages of `fp32` in every mode (and with an fp32 decoder for CALM); their commands."""
    variants = [(mode, ()) for mode in MODES]
    if kind == "calm" and keep_decoder:
        variants += [(mode, ("decoder",)) for mode in MODES]
    folders, commands = [], {}
    for mode, keep in variants:
        name = f"{kind}-{mode}" + "".join(f"-fp32-{graph}" for graph in keep)
        out = work / name
        command = ["calm-edge", "-q", "quantize", "--package", str(fp32), "--mode", mode, "--out", str(out)]
        command += [arg for graph in keep for arg in ("--keep-fp32", graph)]
        command += [arg for path in calibration for arg in ("--calibration-data", path)]
        if requantize:
            command.append("--force")
        if requantize or not (out / "manifest.json").is_file():
            run(command)
        folders.append(str(out))
        commands[name] = " ".join(command)
    return folders, commands


def best_within_goal(rows):
    """Per kind, the fastest quantized package that keeps 97% of the quality at 1.5x speed, or None."""
    best = {}
    for kind in sorted({row["kind"] for row in rows}):
        fits = [row for row in rows if row["kind"] == kind and row["mode"] != "fp32"
                and (row["quality_relative_to_fp32"]["value"] or 0) >= GOAL["quality_relative_at_least"]
                and row["relative_to_fp32"]["decode_speedup"] >= GOAL["decode_speedup_at_least"]]
        fastest = max(fits, key=lambda row: row["relative_to_fp32"]["decode_speedup"], default=None)
        if fastest:
            quality = fastest["quality_relative_to_fp32"]
            lower = quality["value"] - 2 * (quality["stderr"] or 0)
            fastest = {**{key: fastest[key] for key in ("label", "package", "relative_to_fp32",
                                                        "quality_relative_to_fp32")},
                       "established": lower >= GOAL["quality_relative_at_least"],
                       "quality_lower_bound": lower}
        best[kind] = fastest
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="Result name: benchmarks/results/quantization_<name>.json")
    parser.add_argument("--calm", required=True, help="The fp32 CALM package.")
    parser.add_argument("--ar", required=True, help="The fp32 AR package.")
    parser.add_argument("--data", required=True, action="append", help="Evaluation text (repeatable).")
    parser.add_argument("--calibration-data", action="append", default=[], required=True,
                        help="Calibration text for int8-static, apart from --data (repeatable).")
    parser.add_argument("--autoencoder", default=None, help="CALM's autoencoder run, for reconstruction accuracy.")
    parser.add_argument("--detokenize", default="none", choices=["none", "wikitext"])
    parser.add_argument("--max-positions", type=int, default=2000)
    parser.add_argument("--reconstruction-tokens", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: all cores).")
    parser.add_argument("--speed-repeats", type=int, default=5)
    parser.add_argument("--no-keep-decoder", action="store_true", help="Skip the CALM variants with an fp32 decoder.")
    parser.add_argument("--requantize", action="store_true", help="Quantize again even where a package exists.")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()

    work = REPO / "runs" / f"quant_{args.name}"
    commands, packages = {}, [args.calm, args.ar]
    for kind, fp32 in (("calm", args.calm), ("ar", args.ar)):
        folders, quantize_commands = quantize_all(kind, fp32, work, args.calibration_data, args.requantize,
                                                  not args.no_keep_decoder)
        packages += folders
        commands.update(quantize_commands)

    out = Path(args.results) / f"quantization_{args.name}.json"
    table = work / "compare.json"
    png = Path(args.results) / f"quantization_{args.name}.png"
    compare = ["calm-edge", "eval", "compare", *packages, "--out", str(table), "--plot", str(png),
               "--detokenize", args.detokenize, "--max-positions", str(args.max_positions),
               "--reconstruction-tokens", str(args.reconstruction_tokens), "--speed-repeats", str(args.speed_repeats)]
    compare += [arg for path in args.data for arg in ("--data", path)]
    if args.autoencoder:
        compare += ["--autoencoder", args.autoencoder]
    if args.threads:
        compare += ["--threads", str(args.threads)]
    compare_seconds = run(compare)
    commands["compare"] = " ".join(compare)

    report = json.loads(table.read_text())
    result = {"benchmark": f"quantization_{args.name}", "commands": commands, "goal": GOAL,
              "best_within_goal": best_within_goal(report["rows"]), "compare_seconds": compare_seconds, **report}
    write_json_atomic(out, result)
    print(json.dumps(result["best_within_goal"], indent=2))
    print(f"wrote {out} and {png}", file=sys.stderr)


if __name__ == "__main__":
    main()
