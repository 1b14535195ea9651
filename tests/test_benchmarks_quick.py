"""Every benchmark script still runs: `python benchmarks/NAME.py --quick --out TMP` for each script found by glob
(so a new one cannot escape), in a fresh interpreter that imports this checkout, as many at a time as there are
cores; each must exit 0 and write results that carry the stamp, and none may touch benchmarks/results/.

    pytest -m slow tests/test_benchmarks_quick.py -rP     # -rP: each script's quick time (wall, while sharing)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))   # _common: the harness


def _results_state() -> dict:
    return {p.name: p.stat().st_mtime_ns for p in (BENCHMARKS / "results").iterdir()}


def _quick(script: Path, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    out.parent.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], cwd=out.parent, env=env,
                          capture_output=True, text=True, timeout=900)
    return done, time.perf_counter() - start


@pytest.fixture(scope="module")
def quick_runs(request, tmp_path_factory, results_before):
    """The quick runs of the selected scripts, started together, one per core (each single-threaded):
    {script: future of (completed process, seconds)}."""
    scripts = [item.callspec.params["script"] for item in request.session.items
               if getattr(item, "originalname", None) == "test_quick_run"]
    base = tmp_path_factory.mktemp("quick")
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        yield {s: pool.submit(_quick, s, base / s.stem / "out") for s in scripts}


@pytest.fixture(scope="module")
def results_before():
    return _results_state()


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_quick_run(script, results_before, quick_runs, record_property):
    done, seconds = quick_runs[script].result()
    record_property("quick_seconds", round(seconds, 1))
    print(f"{script.name} --quick: {seconds:.1f} s")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = Path(done.args[-1])
    stamps = [json.loads(p.read_text())["stamp"] for p in out.glob("*.json")]
    assert stamps, f"{script.name} --quick wrote no results file in --out"
    for st in stamps:
        assert st["commit"] and st["tree"] and {"python", "torch", "onnxruntime", "onnx", "cpu", "cores", "load",
                                                 "date"} <= st.keys()
    for md in out.glob("*.md"):
        assert "Stamp: onnxfuse commit " in md.read_text(), md.name
    assert _results_state() == results_before, "a quick run touched benchmarks/results/"


def test_stamp_never_calls_a_dirty_tree_clean(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCHMARKS))
    import _common
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "benchmarks" / "results" / "r.md").write_text("old\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    monkeypatch.setattr(_common, "ROOT", repo)
    assert _common.git_state()["tree"] == "clean"
    (repo / "benchmarks" / "results" / "r.md").write_text("new\n")
    assert _common.git_state()["clean"]                         # an earlier run's output is not code
    (repo / "new.py").write_text("")                            # untracked code counts
    assert not _common.git_state()["clean"] and "new.py" in _common.git_state()["tree"]
    (repo / "new.py").unlink()
    (repo / "code.py").write_text("x = 2\n")
    assert not _common.git_state()["clean"] and "UNCOMMITTED" in _common.stamp()["tree"]
    monkeypatch.setattr(_common, "ROOT", tmp_path / "not-a-checkout")
    assert not _common.git_state()["clean"]
