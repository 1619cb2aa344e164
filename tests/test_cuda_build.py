"""Getting a CUDA compiler for the JIT build of the CUDA kernel (ddetr_cli.cuda_toolkit) and the
decisions of `ddetr build-ops --cuda`: where nvcc is looked for and in which order, which wheels are
installed for torch's CUDA version (pip mocked: CI runs the real install through
scripts/check_cuda_compile.sh), that only the explicit command installs, and the one-line message a
first GPU use without a compiler prints."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import ddetr
from torch.utils import cpp_extension

from ddetr_cli import cuda_toolkit, ops_build
from ddetr_cli.commands.build_ops import build_ops_report

PIP_COMMAND = [
    sys.executable,
    "-m",
    "pip",
    "install",
    "--no-deps",
    "nvidia-cuda-nvcc==13.2.*",
    "nvidia-nvvm==13.2.*",
    "nvidia-cuda-crt==13.2.*",
]


def fake_toolkit(home: Path) -> Path:
    """A directory with an executable bin/nvcc and a versioned CUDA runtime, like the pip tree."""
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "bin" / "nvcc").chmod(0o755)
    (home / "lib").mkdir()
    (home / "lib" / "libcudart.so.13").write_text("")
    return home


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A CUDA 13.2 torch on a machine with no nvcc anywhere; the pip tree (empty) is tmp/nvidia/cu13.
    The environment and cpp_extension's CUDA_HOME are restored afterwards."""
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cuda_toolkit, "SYSTEM_CUDA", tmp_path / "usr-local-cuda")
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    tree = tmp_path / "site-packages" / "nvidia" / "cu13"
    tree.mkdir(parents=True)
    monkeypatch.setattr(cuda_toolkit, "pip_tree", lambda: tree)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(ops_build, "_state", {})
    return tree


@pytest.fixture
def builds(monkeypatch):
    """ops_build.build recorded instead of compiling: the list of variants built."""
    built = []

    def build(variant, verbose=False):
        built.append(variant)
        return Path(f"/cache/{variant}")

    monkeypatch.setattr(ops_build, "build", build)
    return built


@pytest.fixture
def pip(monkeypatch):
    """subprocess.run mocked as pip: records the command; installs a fake nvcc unless told to fail."""
    calls = []

    class Pip:
        def __init__(self):
            self.calls, self.tree, self.fail = calls, None, False

        def __call__(self, command, check=False):
            calls.append(command)
            if not self.fail:
                fake_toolkit(self.tree)
            return subprocess.CompletedProcess(command, 1 if self.fail else 0)

    fake = Pip()
    monkeypatch.setattr(subprocess, "run", fake)
    return fake


def test_discovery_order_path_cuda_home_system_then_pip_tree(no_compiler, monkeypatch, tmp_path):
    on_path = fake_toolkit(tmp_path / "on-path")
    env_home = fake_toolkit(tmp_path / "env-home")
    system = fake_toolkit(tmp_path / "usr-local-cuda")
    fake_toolkit(no_compiler)
    monkeypatch.setenv("PATH", f"{tmp_path / 'empty-path'}:{on_path / 'bin'}")
    monkeypatch.setenv("CUDA_HOME", str(env_home))
    assert cuda_toolkit.find_compiler() == cuda_toolkit.Compiler(on_path, "PATH")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    assert cuda_toolkit.find_compiler() == cuda_toolkit.Compiler(env_home, "CUDA_HOME")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nowhere"))
    assert cuda_toolkit.find_compiler() == cuda_toolkit.Compiler(system, str(system))
    (system / "bin" / "nvcc").unlink()
    assert cuda_toolkit.find_compiler() == cuda_toolkit.Compiler(no_compiler, "torch's pip CUDA tree")
    (no_compiler / "bin" / "nvcc").unlink()
    assert cuda_toolkit.find_compiler() is None


def test_pip_tree_is_nvidia_cu_major_of_torchs_cuda(monkeypatch, tmp_path):
    import types

    nvidia = types.ModuleType("nvidia")
    nvidia.__path__ = [str(tmp_path / "nvidia")]
    (tmp_path / "nvidia" / "cu13").mkdir(parents=True)
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    assert cuda_toolkit.pip_tree() == tmp_path / "nvidia" / "cu13"
    monkeypatch.setattr(torch.version, "cuda", "14.0")
    assert cuda_toolkit.pip_tree() is None
    monkeypatch.setattr(torch.version, "cuda", None)
    assert cuda_toolkit.pip_tree() is None


def test_compiler_wheels_match_torchs_cuda_minor():
    assert cuda_toolkit.install_command("13.2") == PIP_COMMAND
    assert cuda_toolkit.compiler_packages("13.0.1")[0] == "nvidia-cuda-nvcc==13.0.*"
    with pytest.raises(
        cuda_toolkit.ToolkitError, match="install the CUDA 12.8 toolkit from NVIDIA and set CUDA_HOME"
    ):
        cuda_toolkit.compiler_packages("12.8")


def test_first_gpu_use_without_compiler_logs_one_line_with_the_command(no_compiler, caplog):
    with caplog.at_level(logging.WARNING, logger="ddetr"):
        assert not ops_build.load("cuda")
        assert not ops_build.load("cuda")
    warnings = [r.getMessage() for r in caplog.records if r.name == "ddetr" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert (
        "no CUDA compiler found" in warnings[0]
        and "run `ddetr build-ops --cuda` to install it" in warnings[0]
    )


def test_build_ops_cuda_installs_the_compiler_then_builds(no_compiler, pip, builds, capsys):
    pip.tree = no_compiler
    report = build_ops_report(cuda=True)
    assert pip.calls == [PIP_COMMAND]
    assert (
        "Installing the CUDA 13.2 compiler from PyPI: -m pip install --no-deps nvidia-cuda-nvcc==13.2.*"
        in (capsys.readouterr().err.replace("\n", ""))
    )
    assert builds == ["cpu", "cuda"] and report["cuda"]["ok"]
    # cpp_extension now builds with the pip tree, given the links it expects.
    assert (
        cpp_extension.CUDA_HOME == str(no_compiler)
        and (no_compiler / "lib64").resolve() == no_compiler / "lib"
    )
    assert (no_compiler / "lib" / "libcudart.so").resolve().name == "libcudart.so.13"


def test_build_ops_cuda_with_a_compiler_installs_nothing(no_compiler, pip, builds, tmp_path, monkeypatch):
    home = fake_toolkit(tmp_path / "toolkit")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert build_ops_report(cuda=True)["cuda"]["ok"]
    assert pip.calls == [] and builds == ["cpu", "cuda"] and cpp_extension.CUDA_HOME == str(home)


def test_build_ops_default_never_installs(no_compiler, pip, builds, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert set(build_ops_report()) == {"cpu"}
    assert pip.calls == [] and builds == ["cpu"]


def test_build_ops_cuda_failures_are_one_line(no_compiler, pip, builds, monkeypatch):
    pip.tree, pip.fail = no_compiler, True
    error = build_ops_report(cuda=True)["cuda"]["error"]
    assert "gave no nvcc (exit status 1)" in error and "\n" not in error
    assert builds == ["cpu"]
    monkeypatch.setattr(torch.version, "cuda", None)
    assert (
        build_ops_report(cuda=True)["cuda"]["error"]
        == "CUDA kernels unavailable: this torch build has no CUDA support"
    )
    assert len(pip.calls) == 1  # nothing installed for a CPU-only torch


def test_build_ops_command_exit_status_and_lines(no_compiler, pip, builds):
    pip.tree, pip.fail = no_compiler, True
    result = ddetr("build-ops", "--cuda")
    assert result.exit_code == 1
    assert "cuda kernel failed: CUDA kernels unavailable:" in result.output.replace("\n", "")
    assert "Traceback" not in result.output


def test_module_main_exports_cuda_home(no_compiler, pip, capsys):
    assert cuda_toolkit.main(["--export"]) == 2
    assert "run `ddetr build-ops --cuda`" in capsys.readouterr().err
    pip.tree = no_compiler
    assert cuda_toolkit.main(["--install", "--export"]) == 0
    assert capsys.readouterr().out == f"export CUDA_HOME='{no_compiler}'\n"
