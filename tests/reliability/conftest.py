"""Fixtures of the reliability tests: a tiny teacher and tiny CPU QAT configs (built here, nothing
downloaded; the same pattern as tests/training/conftest.py, copied so the two stay independent)."""

import sys
from pathlib import Path

import pytest
from diffusers import DiTTransformer2DModel

# faultkit (helpers shared by these tests and faulty_train.py) is imported by name, also under
# pytest's --import-mode=importlib, which puts no test directory on sys.path
sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultkit import TINY_DIT, write_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "dit"
    DiTTransformer2DModel(**TINY_DIT).save_pretrained(path)
    return str(path)


@pytest.fixture
def make_config():
    return write_config


@pytest.fixture(scope="session")
def qat_config(tmp_path_factory, tiny_teacher):
    """The default tiny QAT config (6 steps, a checkpoint every 2)."""
    return write_config(tmp_path_factory.mktemp("cfg") / "qat.yaml", tiny_teacher)
