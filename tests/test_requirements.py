"""requirements.txt says what the code needs: every module imports, and the installed versions meet its bounds;
pyproject.toml installs every module, requirements.txt and the files the code looks up.

The lower bounds are the oldest versions the suite was run with (README, "Tests"); this test checks that the
environment it runs in respects them, so a bound raised in the code but not in the file shows up here.
"""
import ast
import importlib
import importlib.metadata
import os
import posixpath
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(name[:-3] for name in os.listdir(ROOT) if name.endswith(".py"))


def requirements(path):
    """(distribution name, lower bound) of each line `name>=version` of a requirements file."""
    found = []
    with open(path) as f:
        for line in f:
            match = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", line.split("#")[0])
            if match:
                found.append((match.group(1), match.group(2)))
    return found


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_installed_versions_meet_the_bounds_and_nothing_is_capped():
    listed = requirements(os.path.join(ROOT, "requirements.txt"))
    assert {name for name, _ in listed} >= {"torch", "torchvision", "onnxruntime", "av", "pyyaml"}
    for name, bound in listed:
        installed = importlib.metadata.version(name)
        assert version_tuple(installed) >= version_tuple(bound), f"{name} {installed} < {bound}"
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        assert not re.search(r"<=?\s*\d", f.read()), "an upper bound without a known break"
    import torch
    import torchvision
    assert version_tuple(torchvision.__version__) >= (0, 21)  # transforms.v2's make_params/transform overrides
    assert version_tuple(torch.__version__) >= (2, 6)


def pyproject():
    """pyproject.toml as setuptools reads it, with the dependencies it expands from requirements.txt."""
    from setuptools.config.pyprojecttoml import read_configuration
    return read_configuration(os.path.join(ROOT, "pyproject.toml"), expand=True)


def shipped_files():
    """The paths the modules pass to config.shipped_file, read from their source."""
    found = set()
    for module in MODULES:
        with open(os.path.join(ROOT, f"{module}.py")) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and getattr(func, "id", getattr(func, "attr", None)) == "shipped_file":
                assert all(isinstance(arg, ast.Constant) for arg in node.args), f"{module}: shipped_file of a variable"
                found.add(posixpath.join(*(arg.value for arg in node.args)))
    return found


def test_pyproject_installs_every_top_level_module():
    assert sorted(pyproject()["tool"]["setuptools"]["py-modules"]) == MODULES


def name_and_specifier(lines):
    """(name, specifier) of requirement strings, trailing comments dropped as setuptools and pip do."""
    from packaging.requirements import Requirement
    parsed = [Requirement(re.sub(r"\s+#.*", "", line)) for line in lines]
    return [(requirement.name, str(requirement.specifier)) for requirement in parsed]


REQUIREMENTS_TXT = [(name, f">={bound}") for name, bound in requirements(os.path.join(ROOT, "requirements.txt"))]


def test_pyproject_dependencies_are_requirements_txt():
    assert name_and_specifier(pyproject()["project"]["dependencies"]) == REQUIREMENTS_TXT


def test_pyproject_installs_every_file_the_code_looks_up():
    """Each file is installed at config.DATA_FOLDER plus its path in the checkout, where shipped_file looks."""
    installed = set()
    for folder, sources in pyproject()["tool"]["setuptools"]["data-files"]:
        for source in sources:
            assert os.path.isfile(os.path.join(ROOT, source)), source
            assert folder == posixpath.join(config.DATA_FOLDER.replace(os.sep, "/"),
                                            posixpath.dirname(source)).rstrip("/"), (folder, source)
            installed.add(source)
    looked_up = shipped_files()
    assert "config_transfer_learning.json" in looked_up
    assert looked_up <= installed, f"not installed: {sorted(looked_up - installed)}"


PIP_OFFLINE = ("--no-deps", "--no-index", "--disable-pip-version-check", "-q")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The project's wheel, built from a copy of the files pyproject.toml names (a build writes build/ and an
    egg-info beside its sources), with this environment's setuptools: no network."""
    tmp = tmp_path_factory.mktemp("wheel")
    project = pyproject()
    files = ["pyproject.toml", "requirements.txt", "README.md"]
    files += [f"{module}.py" for module in project["tool"]["setuptools"]["py-modules"]]
    files += [source for _, sources in project["tool"]["setuptools"]["data-files"] for source in sources]
    for name in files:
        os.makedirs(os.path.dirname(tmp / "src" / name), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), tmp / "src" / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", *PIP_OFFLINE, "--no-build-isolation",
                    str(tmp / "src"), "-w", str(tmp / "dist")], check=True)
    (built,) = (tmp / "dist").iterdir()
    return built


CHECK_INSTALLED = """
import os, sys
import config
from finetune_single_class import finetune
from checkpoints import STARTER_PATH
from model_lightweight import create_lightweight_model
root = os.path.realpath(sys.argv[1]) + os.sep
for path in (config.__file__, config.DEFAULT_CONFIG_PATH, STARTER_PATH):
    assert os.path.realpath(path).startswith(root), f"{path} is not in the installed copy {root}"
config.script_defaults("finetuning")
create_lightweight_model(1, "lite0", starter=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["--target", "--prefix"])
def test_installed_wheel_imports_from_another_folder_and_finds_its_files(wheel, tmp_path, layout):
    """`pip install .` without the checkout on the path: the API imports, and the installed copy reads its own
    default config and starter detector. --target puts modules and data in one folder; --prefix lays them out
    as a venv or ~/.local does (lib/pythonX.Y/site-packages beside share/)."""
    root = tmp_path / "installed"
    subprocess.run([sys.executable, "-m", "pip", "install", *PIP_OFFLINE, layout, str(root), str(wheel)], check=True)
    site = root if layout == "--target" else root / os.path.relpath(sysconfig.get_path("purelib"),
                                                                   sysconfig.get_path("data"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, "-c", CHECK_INSTALLED, str(root)], cwd=elsewhere,
                            env={**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    (installed,) = importlib.metadata.distributions(path=[str(site)])
    assert name_and_specifier(installed.requires) == REQUIREMENTS_TXT
