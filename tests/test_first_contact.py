"""The README's first command as a user types it: train.py on configs/demo.yaml, from a fresh
folder (the demo's 5000 built-in scenes are generated on first use), stopped after two steps."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_demo_command_trains(tmp_path):
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "python3 train.py configs/demo.yaml" in readme
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "configs/demo.yaml",
                           "--exit-after", "2"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    assert (run / "model.pt").is_file() and (run / "config.yaml").is_file()
    assert (tmp_path / "data" / "demo_scenes" / "metadata.npz").is_file()
    assert "Reached iteration 2" in proc.stdout and "\r" not in proc.stdout + proc.stderr
