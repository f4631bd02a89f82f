"""benchmarks/conftest.py writes each finished benchmark at once, so a run stopped by a time limit keeps them."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark")
ROOT = Path(__file__).resolve().parents[1]

BENCH = '''
import os


def test_first(benchmark):
    benchmark.pedantic(sum, args=([1, 2, 3],), rounds=2, iterations=1)


def test_second_is_killed(benchmark):
    benchmark.pedantic(sum, args=([4],), rounds=2, iterations=1)
    os._exit(3)   # a step's time limit: no session finish, no hook after this test
'''


def test_a_run_killed_after_a_benchmark_has_written_it(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    shutil.copy(ROOT / "benchmarks" / "conftest.py", d / "conftest.py")
    (d / "bench_kill.py").write_text(BENCH)
    out = tmp_path / "results"
    # not an xdist worker's variables: pytest-benchmark would take the child for a worker and disable itself
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "GPUHEART_BENCH_NO_SAVE"))}
    env.update(GPUHEART_BENCH_RESULTS=str(out), PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(d / "bench_kill.py"),
                        "--benchmark-only"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 3, r.stdout + r.stderr
    files = list(out.glob("*.json"))
    assert len(files) == 1, r.stdout + r.stderr
    names = [b["name"] for b in json.loads(files[0].read_text())["benchmarks"]]
    assert names == ["test_first"]
    assert files[0].with_suffix(".md").is_file()
