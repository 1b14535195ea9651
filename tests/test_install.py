"""Install paths: onnxruntime and onnxruntime-gpu install the same module, so no documented install command
may put both on one machine (issue 17)."""
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILDS = {"onnxruntime", "onnxruntime-gpu"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def documented_commands() -> list[str]:
    """Every `pip install` in a fenced block of README.md (a `cmd && cmd` line gives each)."""
    commands, fenced = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            commands += [c.split("#")[0].strip() for c in line.split("&&") if c.strip().startswith("pip install")]
    return commands


def requirements_of(command: str) -> set[str]:
    """The direct requirements a command installs: onnxfuse's core and chosen extras, and named packages."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for arg in command.split()[2:]:
        arg = arg.strip("'\"")
        if arg.startswith("-"):
            continue
        if arg.startswith((".", "onnxfuse")):
            extras = re.search(r"\[(.*)\]", arg)
            names |= {_name(r) for r in project["dependencies"]}
            for extra in (extras.group(1).split(",") if extras else []):
                names |= {_name(r) for r in project["optional-dependencies"][extra.strip()]}
        else:
            names.add(_name(arg))
    return names


def test_every_documented_install_command_chooses_one_onnxruntime_build():
    commands = documented_commands()
    assert len(commands) >= 4 and any("[gpu" in c for c in commands), commands
    for command in commands:
        builds = requirements_of(command) & BUILDS
        assert len(builds) == 1, (command, builds)


def stub_wheel(folder: Path, name: str, version: str) -> None:
    """A wheel with metadata only: enough for pip to resolve a package this machine's index lacks."""
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")


@pytest.mark.slow                  # pip resolves the whole dependency tree
def test_the_gpu_install_resolves_without_the_cpu_build(tmp_path):
    """What pip itself would install for the documented GPU command, dependencies of dependencies included."""
    command = next(c for c in documented_commands() if "[gpu" in c)
    extras = re.search(r"\[(.*?)\]", command).group(1)
    project = tmp_path / "project"          # a copy: building its metadata leaves nothing in the checkout
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "onnxfuse", project / "onnxfuse", ignore=shutil.ignore_patterns("__pycache__"))
    stub_wheel(tmp_path, "onnxruntime-gpu", "1.99.0")
    # the torch the README pins (its build lies on this machine's disk): the same answer, resolved faster
    pins = re.findall(r"torch==[\w.]+", (ROOT / "README.md").read_text())[:1]
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--no-build-isolation", "--report", str(report), "--find-links", str(tmp_path),
                             f"{project}[{extras}]", *pins],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    installed = {_name(item["metadata"]["name"]) for item in json.loads(report.read_text())["install"]}
    assert "onnxruntime-gpu" in installed and "onnxruntime" not in installed, sorted(installed)
