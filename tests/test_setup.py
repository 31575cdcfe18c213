"""`make setup` stops with a message naming what failed and how to fix it."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run_setup(env_overrides, tmp_path):
    env = dict(os.environ)
    env.update(env_overrides)
    return subprocess.run(
        ["bash", str(REPO / "tools" / "setup.sh")],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip


def test_missing_cross_compiler_is_named_with_its_fix(tmp_path):
    # A PATH with every tool setup uses except the ARM cross-compiler.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ["bash", "dirname", "cat", "grep", "dpkg-query", "sha256sum", "cut", "id",
                 "printf", "qemu-system-arm", "make", "cc", "mapfile", "python3"]:  # fmt: skip
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    result = _run_setup({"PATH": str(bin_dir)}, tmp_path)
    assert result.returncode == 1
    assert "setup FAILED at: tool check: arm-none-eabi-gcc not on PATH" in result.stderr
    assert "install the Debian package" in result.stderr


@pytest.mark.slow
def test_a_firmware_that_does_not_compile_stops_setup_and_names_the_file(tmp_path):
    """A copy of the working image's build dir (mtimes kept: the C objects and qstr headers
    are up to date, as in a tree where a firmware file was just broken), so the build gets
    to the freezing at once, which MicroPython redoes on every make (frozen_content.c is
    FORCE), instead of compiling the whole port first into an empty dir."""
    broken = tmp_path / "fw"
    broken.mkdir()
    (broken / "payload_broken.py").write_text("def broken(:\n")
    (broken / "manifest.py").write_text('freeze(".", "payload_broken.py")\n')
    shutil.copytree(REPO / "build" / "qemu", tmp_path / "build", symlinks=True)
    result = _run_setup(
        {"QEMU_BUILD": str(tmp_path / "build"), "FIRMWARE_MANIFEST": str(broken / "manifest.py")},
        tmp_path,
    )
    assert result.returncode == 1
    assert "error compiling payload_broken.py" in result.stdout + result.stderr
    assert "setup FAILED at: MicroPython builds" in result.stderr
    # the working image was not touched
    assert (REPO / "build" / "qemu" / "firmware.elf").exists()


def test_test_and_lint_tools_are_an_extra_that_setup_installs():
    """`pip install .` gives users the runtime only; `make setup` installs the `dev` extra
    (pytest, ruff, ...), every one pinned in pyproject.toml and in requirements.lock."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    tools = {"pytest", "pytest-benchmark", "pytest-timeout", "pytest-xdist", "hypothesis", "ruff"}
    runtime = {pin.split("==")[0].lower() for pin in project["dependencies"]}
    assert not runtime & tools
    dev = project["optional-dependencies"]["dev"]
    assert {pin.split("==")[0].lower() for pin in dev} == tools
    lock = set((REPO / "requirements.lock").read_text().lower().split())
    assert all("==" in pin and pin.lower() in lock for pin in dev + project["dependencies"])
    assert '-e ".[dev]"' in (REPO / "tools" / "setup.sh").read_text()
