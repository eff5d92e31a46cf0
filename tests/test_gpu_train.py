"""benchmarks/gpu_train.sh, the one-GPU training run, checked on the CPU at the tiny preset: it
trains the three models, evaluates them with the true and a shuffled context, and leaves int4
packages that the runtime opens, with a results file that says what it measured."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from calm_edge.runtime import Model

REPO = Path(__file__).resolve().parent.parent


def test_the_gpu_training_script_runs_end_to_end_at_the_tiny_size(tmp_path):
    env = {**os.environ, "CALM_EDGE_GPU_TRAIN_SIZE": "tiny", "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_train.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    results = json.loads((out / "gpu_train.json").read_text())
    assert results["size"] == "tiny" and results["device"] == "cpu"
    calm, ar = results["runs"]["calm"]["summary"], results["runs"]["ar"]["summary"]
    assert ar["step"] == 6 and calm["step"] >= 1  # CALM takes the steps of equal training FLOPs
    assert abs(calm["training_flops"] - ar["training_flops"]) < 0.1 * ar["training_flops"]
    assert results["runs"]["calm"]["tokens_per_second_median"] > 0
    for kind in ("calm", "ar"):
        quality = results["brierlm"][kind]
        assert set(quality["by_offset"]) == {"0", "1", "2", "3"} and "brier_1" in quality["other_context"]
        with tarfile.open(out / f"{kind}-int4.tar") as archive:
            archive.extractall(tmp_path / "unpacked", filter="data")
        model = Model(tmp_path / "unpacked" / f"{kind}-int4")
        assert model.manifest.kind == kind
    sizes = [p.stat().st_size for p in out.iterdir() if p.is_file()]
    assert len(sizes) <= 8 and max(sizes) < 16 * 2**20  # what a device run can bring back
