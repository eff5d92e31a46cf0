"""The packages committed under models/: small enough to ship, and they run from a fresh clone."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from calm_edge.cli import main
from calm_edge.runtime.generator import GeneratorParams
from calm_edge.runtime.model import Model
from calm_edge.runtime.text_generation import generate

MODELS = Path(__file__).resolve().parent.parent / "models"
PACKAGES = {"calm": MODELS / "calm-small-int4", "ar": MODELS / "ar-small-int4"}
WIKITEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext103-test-doc.jsonl"


def test_the_committed_packages_fit_the_budget():
    files = [f for folder in PACKAGES.values() for f in folder.iterdir()]
    assert sum(f.stat().st_size for f in files) <= 30_000_000


@pytest.mark.parametrize("kind", ["calm", "ar"])
def test_a_committed_package_loads_verified_and_generates(kind):
    model = Model(PACKAGES[kind], threads=1)  # checks every file's sha256 against the manifest
    assert model.kind == kind and model.manifest["quantization"]["mode"] == "int4"
    assert model.manifest["model"]["vocab_size"] == 8192
    params = GeneratorParams(max_new_tokens=24, seed=3, stop_at_eos=False)
    first, again = generate(model, "The history of the city", params), generate(model, "The history of the city", params)
    assert len(first.token_ids) == 24 and first.text.strip()
    assert first.token_ids == again.token_ids  # one seed, one text


def test_the_readme_commands_run_on_the_committed_packages(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "generate", "--package", str(PACKAGES["calm"]), "The history of the city",
                                  "--seed", "3", "--max-new-tokens", "16"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("The history of the city") and len(result.stdout) > len("The history of the city")
    if not WIKITEXT.is_file():
        pytest.fail(f"{WIKITEXT} is missing: the tests expect ../shared/data beside the repository")
    out = tmp_path / "eval.json"
    result = runner.invoke(main, ["-q", "eval", "package", "--package", str(PACKAGES["ar"]), "--data", str(WIKITEXT),
                                  "--detokenize", "wikitext", "--max-positions", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["kind"] == "ar" and report["quantization"] == "int4"
    assert report["by_offset"]["0"]["positions"]["1"] == 32


def test_the_readme_python_example_runs_on_the_committed_packages(tmp_path, monkeypatch):
    """The code block of README's "The Python runtime", run as it stands (one generation shortened)."""
    readme = (MODELS.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## The Python runtime\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'Model("models/calm-small-int4"' in code and "generator.step()" in code
    monkeypatch.chdir(MODELS.parent)
    printed = []
    namespace = {"print": lambda *args, **kwargs: printed.append(args)}
    exec(compile(code.replace("max_new_tokens=64", "max_new_tokens=24"), "README.md", "exec"), namespace)
    generator = namespace["generator"]
    assert generator.done and generator.stop_reasons[0] in ("two sentences", "eos", "max_new_tokens", "context")
    assert printed[-1][0] == generator.tokens[0] and printed[-1][2].new_tokens == len(generator.tokens[0])
