"""The install metadata says what the README and ComfyUI's tools expect."""
import re
from pathlib import Path

import tomllib
from conftest import REPO


def _pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_requirements_txt_lists_the_runtime_dependencies_but_torch():
    deps = _pyproject()["project"]["dependencies"]
    listed = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    listed = [line for line in listed if line]
    assert sorted(listed) == sorted(d for d in deps if not d.startswith("torch"))


def test_no_top_level_nodes_module_and_registry_name():
    project = _pyproject()
    packages = project["tool"]["setuptools"]["packages"]
    assert "nodes" not in packages and "sora.nodes" in packages
    assert project["tool"]["setuptools"]["package-dir"]["sora.nodes"] == "nodes"
    name = project["project"]["name"]
    assert "comfyui" not in name.lower() and re.fullmatch(r"[a-z][a-z0-9_.-]*", name)
    assert {"PublisherId", "DisplayName", "Icon"} <= set(project["tool"]["comfy"])
    assert project["project"]["scripts"]["sora"] == "sora.cli:main"


def test_readme_commands_name_real_files():
    readme = (REPO / "README.md").read_text()
    for path in re.findall(r"workflows/(?:api/)?[\w.]+\.json", readme):
        assert (REPO / path).exists(), path
    assert "python -m pytest" in readme


def test_ci_runs_the_readme_test_command_word_for_word():
    readme = (REPO / "README.md").read_text()
    (command,) = [line.strip() for line in readme.splitlines() if line.strip().endswith("python -m pytest -q")]
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert ci == [command]
    assert "ruff check ." in command  # the lint rules of pyproject.toml, kept clean in CI


def test_comfy_cli_validates_the_pack():
    """`comfy node validate` (comfy-cli, a test dependency): the registry metadata and its security checks."""
    import shutil
    import subprocess
    import sys

    # on PATH, or beside this Python (a virtual environment that is not activated)
    comfy = shutil.which("comfy") or shutil.which("comfy", path=str(Path(sys.executable).parent))
    assert comfy is not None, "comfy-cli is a test dependency: pip install -e '.[test]'"
    done = subprocess.run([comfy, "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode == 0 and "All validation checks passed" in said, said
