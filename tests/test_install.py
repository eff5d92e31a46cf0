"""Install and import the package as a user would: torch-free runtime, non-editable install."""
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from conftest import REPO


def test_runtime_imports_without_torch():
    # sys.modules["torch"] = None makes every `import torch` fail, as on a device without it.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import calm_edge.runtime, calm_edge.data, calm_edge.tokenizer, calm_edge.config, calm_edge.cli, calm_edge.evaluation.brierlm\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_non_editable_install_into_a_fresh_venv(tmp_path):
    # Build from a copy of the source, as `pip install .` from a clone would.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    env_dir = tmp_path / "venv"
    # The running environment's site-packages provide the dependencies, pip and setuptools, so the
    # test needs no network. Not `system_site_packages`: that is the base interpreter's, which lacks
    # them when the tests run in a virtual environment (README's set-up). Plain paths in a .pth
    # file, not `site.addsitedir`, so the running environment's own editable install of calm-edge
    # (a .pth hook there) stays out of the new one.
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    inner_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    outer_sites = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(inner_site) / "running-environment.pth").write_text("\n".join(outer_sites) + "\n")
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet", str(source)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    where = subprocess.run(
        [python, "-c", "import calm_edge, calm_edge.runtime, calm_edge.training, calm_edge.export, calm_edge.models, "
                       "calm_edge.serve.app; print(calm_edge.__file__); print(calm_edge.runtime.__file__); "
                       "print(calm_edge.models.__file__); print(calm_edge.serve.app.__file__)"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    for line in where.stdout.split():
        assert line.startswith(str(env_dir)), f"imported {line} instead of the installed copy"

    cli = subprocess.run([env_dir / "bin" / "calm-edge", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert "tokenizer" in cli.stdout and "data" in cli.stdout and "serve" in cli.stdout
