"""benchmarks/refs.sh: commits archived side by side, each copy's script run against its own package."""

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "refs.sh"

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_each_copy_runs_its_own_package(tmp_path):
    repo = tmp_path / "repo"
    for d in ("robuq", "benchmarks", "tests"):
        (repo / d).mkdir(parents=True)
    (repo / "tests" / "keep").write_text("")
    (repo / "benchmarks" / "which.py").write_text("import robuq\nprint('version', robuq.VERSION)\n")
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@t"), _git(repo, "config", "user.name", "t")
    for v in ("one", "two"):
        (repo / "robuq" / "__init__.py").write_text(f"VERSION = {v!r}\n")
        _git(repo, "add", "-A"), _git(repo, "commit", "-qm", v)

    def refs(*args, **env):
        return subprocess.run(["bash", str(SCRIPT), *args], cwd=repo, capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", **env})

    assert refs("archive", "HEAD~1", "HEAD").returncode == 0
    bad = refs("archive", "HEAD", "no-such-ref")
    assert bad.returncode == 2 and "unknown ref no-such-ref" in bad.stderr
    assert (repo / "out" / "refs" / "HEAD_1").is_dir()  # a bad ref leaves the archived copies alone
    python = str(Path(shutil.which("python3")).parent)
    ran = subprocess.run(["bash", str(SCRIPT), "run", "benchmarks/which.py"], cwd=repo, capture_output=True,
                         text=True, env={"PATH": f"{python}:/usr/bin:/bin", "OUT": str(tmp_path / "out")})
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "out" / "refs_HEAD_1.log").read_text().strip() == "version one"
    assert (tmp_path / "out" / "refs_HEAD.log").read_text().strip() == "version two"
    assert ran.stdout.index("=== HEAD_1") < ran.stdout.index("=== HEAD ")
