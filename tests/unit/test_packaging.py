"""One import name: the wheel installs ``kpimon`` and nothing else at the top of site-packages.

The project's folders (``agents/``, ``streams/``, ``config/``, ``dashboards/``)
install as ``kpimon.agents`` and so on (pyproject.toml ``package-dir``), so a
user's own ``config.py`` or an unrelated ``agents`` package cannot clash with
them.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("agents", "streams", "config", "dashboards")


def source_copy(dest: Path) -> Path:
    """The files git would ship (tracked, or untracked and not ignored), without build/ leftovers."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_the_wheel_installs_one_top_level_name(tmp_path: Path) -> None:
    src = source_copy(tmp_path / "src")
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("kpimon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"kpimon", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, top
    packages = [init.parent.relative_to(ROOT) for folder in FOLDERS for init in (ROOT / folder).rglob("__init__.py")]
    missing = [str(pkg) for pkg in packages if f"kpimon/{pkg.as_posix()}/__init__.py" not in names]
    assert not missing, f"packages left out of the wheel (pyproject.toml packages): {missing}"
    # data files the code reads at run time
    for data in ("kpimon/config/kpimon.yaml", "kpimon/config/kpis.yaml", "kpimon/agents/runtime/pom.xml",
                 "kpimon/dashboards/generated/kpimon-operations.json"):
        assert data in names
    assert not [n for n in names if n.startswith("kpimon/tests/") or "/benchmarks/" in n]


def test_no_module_imports_a_bare_folder_name() -> None:
    """Every import of the project's code goes through ``kpimon.``: a bare ``import config``
    would pick up whatever the user's working folder holds."""
    bad = []
    for path in [*ROOT.glob("*/**/*.py")]:
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in (*FOLDERS, "tests", "benchmarks", "kpimon"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            bad += [f"{rel}:{node.lineno}: {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert not bad, bad
