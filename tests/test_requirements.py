"""requirements.txt says what the code needs: every module imports, and the installed versions meet its bounds.

The lower bounds are the oldest versions the suite was run with (README, "Tests"); this test checks that the
environment it runs in respects them, so a bound raised in the code but not in the file shows up here.
"""
import importlib
import importlib.metadata
import os
import re

import pytest

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
