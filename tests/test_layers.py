"""The layers of README.md's Layout table, checked over every import of the installed code.

Each module of the package belongs to one layer: the shared `base` (calm_edge/ but for the top
layer), `top` (the CLI, the quickstart, the benchmark harness and the server), or a stage folder
(`training`, `runtime`, `export`, `evaluation`). README.md's table says which layers each may
import; this test reads it from there, so the table and the code cannot drift apart. Every
import counts, at the top of a file and inside functions alike, and the graph of all imports
between modules must have no circle: then no function-level import exists only to break one.
Torch stays in the model code (`calm_edge.models`) of the base layer, and out of the runtime.
"""
import ast
import re
import shutil
import sys

from conftest import REPO

FOLDERS = {"calm_edge": "calm_edge", "training": "calm_edge.training", "runtime": "calm_edge.runtime",
           "export": "calm_edge.export", "evaluation": "calm_edge.evaluation"}
TOP = ("calm_edge.cli", "calm_edge.quickstart", "calm_edge.bench", "calm_edge.serve")
MODELS = "calm_edge.models"
NEVER_IN_RUNTIME = ("torch", "safetensors", "transformers", "onnx", "onnx_ir", "optimum")
LAYERS = ("base", "top", "training", "runtime", "export", "evaluation")


def layer_of(module):
    """The layer of a module of the package, by its import name."""
    if any(module == top or module.startswith(top + ".") for top in TOP):
        return "top"
    for layer in ("training", "runtime", "export", "evaluation"):
        if module == f"calm_edge.{layer}" or module.startswith(f"calm_edge.{layer}."):
            return layer
    return "base"


def allowed_layers(readme):
    """{layer: set of layers it may import}, read from the `may import` column of README's Layout table."""
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    layer_column, allowed_column = header.index("layer"), header.index("may import")
    allowed = {}
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        layer = re.findall(r"`(\w+)`", cells[layer_column])
        if not layer or layer[0] not in LAYERS:
            continue
        text = cells[allowed_column]
        allowed[layer[0]] = set(LAYERS) if text.startswith("everything") else {
            name for name in re.findall(r"`([\w.]+)`", text) if name in LAYERS}
    return allowed


def project_modules(root):
    """{import name: file} of every module in the stage folders under `root`."""
    modules = {}
    for folder, prefix in FOLDERS.items():
        for path in sorted((root / folder).rglob("*.py")):
            if "build" in path.relative_to(root).parts:
                continue
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = path
    return modules


def imports_of(path, module, modules):
    """[(imported name, line, resolved project module or None)] for every import statement in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from a import b` imports the module a.b when there is one, else names of a.
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for name in names:
            target = name
            while target and target not in modules:
                target = target.rpartition(".")[0]
            found.append((name, node.lineno, target if name.startswith("calm_edge") and target else None))
    return found


def violations(root, readme):
    """Every import that breaks the layer table or the torch rules, as readable lines."""
    allowed = allowed_layers(readme)
    modules = project_modules(root)
    problems = []
    for module, path in modules.items():
        mine = layer_of(module)
        where = path.relative_to(root)
        for name, line, target in imports_of(path, module, modules):
            top_name = name.split(".")[0]
            if target is not None:
                theirs = layer_of(target)
                if theirs not in allowed[mine]:
                    problems.append(f"{where}:{line}: {mine} imports {target} ({theirs})")
                if mine == "runtime" and (target == MODELS or target.startswith(MODELS + ".")):
                    problems.append(f"{where}:{line}: runtime imports {target}, which needs torch")
            elif top_name in NEVER_IN_RUNTIME and mine == "runtime":
                problems.append(f"{where}:{line}: runtime imports {name}; the runtime never needs it")
            elif top_name == "torch" and mine == "base" and not (module == MODELS or module.startswith(MODELS + ".")):
                problems.append(f"{where}:{line}: {module} imports torch; in the base layer only calm_edge.models may")
    return problems


def cycles(root):
    """Circles in the graph of every import between modules (a list of module paths, each a circle)."""
    modules = project_modules(root)
    graph = {module: sorted({target for _, _, target in imports_of(path, module, modules)
                             if target and target != module}) for module, path in modules.items()}
    found, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                found.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in graph:
        if module not in state:
            visit(module, [module])
    return found


README = (REPO / "README.md").read_text(encoding="utf-8")


def test_the_layout_table_names_every_layer():
    allowed = allowed_layers(README)
    assert set(allowed) == set(LAYERS)
    assert allowed["runtime"] == {"base", "runtime"}
    assert "evaluation" not in allowed["export"] and "top" not in allowed["evaluation"]


def test_every_import_follows_the_layer_table():
    assert violations(REPO, README) == []


def test_no_module_imports_one_that_imports_it_back():
    assert cycles(REPO) == []


def test_the_checks_catch_planted_violations(tmp_path):
    for folder in FOLDERS:
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("build", "__pycache__"))
    assert violations(tmp_path, README) == [] and cycles(tmp_path) == []

    model = tmp_path / "runtime" / "model.py"
    model.write_text(model.read_text() + "\n\ndef planted():\n    from calm_edge.export import exporter\n    import torch\n")
    errors = tmp_path / "calm_edge" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom calm_edge.fileio import sha256_of\n")  # fileio imports errors
    found = violations(tmp_path, README)
    assert any("runtime/model.py" in v and "calm_edge.export.exporter (export)" in v for v in found)
    assert any("runtime/model.py" in v and "imports torch" in v for v in found)
    assert any(circle[0] == circle[-1] and {"calm_edge.errors", "calm_edge.fileio"} <= set(circle)
               for circle in cycles(tmp_path))


def test_the_runtime_reaches_only_the_base_and_itself():
    """Transitively: what `import calm_edge.runtime` loads of the package (torch-free, no model code)."""
    modules = project_modules(REPO)
    seen, todo = set(), ["calm_edge.runtime"]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += [t for _, _, t in imports_of(modules[current], current, modules) if t]
    assert {layer_of(m) for m in seen} == {"base", "runtime"}
    assert not any(m == MODELS or m.startswith(MODELS + ".") for m in seen)


def test_the_layout_table_and_setup_py_match_the_tree():
    section = README.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.strip("|").split("|")[0] for line in section.splitlines() if line.startswith("| `")]
    named = {path.rstrip("/") for cell in first_cells for path in re.findall(r"`([\w/.]+)`", cell)}
    for folder in named:
        assert (REPO / folder).exists(), f"README's Layout names {folder}, which is not in the tree"
    tops = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".") and any(p.glob("*.py"))}
    assert tops <= named, f"folders with code that README's Layout does not name: {sorted(tops - named)}"
    # Every package in the stage folders is installed (setup.py's list), and nothing else is.
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    listed = set(re.findall(r'^\s+"(calm_edge[\w.]*)",$', setup, re.M))
    found = {module for module, path in project_modules(REPO).items() if path.name == "__init__.py"}
    assert listed == found
