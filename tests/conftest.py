import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def dmdx_home(tmp_path_factory):
    """One cache folder (classifiers, pixel backbones) for the whole session."""
    path = os.environ.get("DMDX_TEST_HOME") or str(tmp_path_factory.mktemp("dmdx_home"))
    return path


@pytest.fixture(autouse=True)
def _home(dmdx_home, monkeypatch):
    monkeypatch.setenv("DMDX_HOME", dmdx_home)
