"""What an install of osrt-fast holds: a wheel built from the repository has the package, its
data subpackage and the kernels under their installed name `osrt_fast.kernels` (pyproject's
package-dir), and no top-level `kernels` package to clash with another distribution's."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_a_wheel_installs_the_kernels_as_osrt_fast_kernels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("osrt_fast", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), src / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"),
                          str(src)], check=True, cwd=tmp_path)
    [wheel] = (tmp_path / "wheel").glob("osrt_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package"
    for expected in ("osrt_fast/kernels/slot_attention.py", "osrt_fast/kernels/aot.py",
                     "osrt_fast/data/records.py", "osrt_fast/model.py"):
        assert expected in names, expected

    site = tmp_path / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-compile", "--target", str(site), str(wheel)],
                   check=True, cwd=tmp_path)
    probe = ("import osrt_fast, osrt_fast.kernels.slot_attention as k, osrt_fast.data; "
             "from osrt_fast.model import OSRT; OSRT({'encoder_kwargs': {'num_slots': 2}}); "
             "print(osrt_fast.__file__); print(k.__file__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr
    package, kernel = out.stdout.split()
    assert package == str(site / "osrt_fast" / "__init__.py")
    assert kernel == str(site / "osrt_fast" / "kernels" / "slot_attention.py")
    # The installed commands: entry points of the wheel, each running from any folder.
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    commands = ("osrt-train", "osrt-evaluate", "osrt-render", "osrt-encode", "osrt-view",
                "osrt-scenes", "osrt-check-data", "osrt-shards")
    for name in commands:
        assert f"{name} = osrt_fast." in scripts, name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("osrt-train", "osrt-scenes"):
        out = subprocess.run([str(site / "bin" / name), "--help"], cwd=elsewhere, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(site)})
        assert out.returncode == 0 and "usage:" in out.stdout, (name, out.stderr)
