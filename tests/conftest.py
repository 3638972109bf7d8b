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


@pytest.fixture(scope="session")
def pipeline_students(tmp_path_factory):
    """``get(family)``: a one-step-trained LoRA student of a tiny pipeline (sd, sd_v, sdxl, sd3, flux; SD with SD1.5's
    PNDM scheduler) at the recipe's LoRA settings, its LoRA weights randomised (helpers.lora_student); built once
    per session on first use (tests/test_export.py, test_pipeline_eval.py)."""
    from helpers import lora_student, pndm_pipeline
    from dmdx.teachers.image.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("pipeline_students")
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            folder = root / f"pipe_{family}"
            pipe = pndm_pipeline(folder) if family == "sd" else make_tiny_pipeline(family, folder)
            (root / family).mkdir()
            times = {"flux": (1.0,), "sd_v": (1.0,), "sd3": (1.0, 0.75, 0.5, 0.25)}.get(family, (1.0, 0.5))
            cache[family] = lora_student(pipe, root / family, times=times)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-pipeline tests (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
