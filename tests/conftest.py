"""Test setup: one thread (two thrash on the shared 2-core box), offline hub, no telemetry."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["TDM_MLFLOW"] = "0"  # tests that track turn it on against their own store

import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path as _Path  # noqa: E402

# torchao (distill.base_quantization) lives beside the venv (scripts/bootstrap.sh); diffusers decides whether it
# exists once, at its first import, so it goes on sys.path before any test module imports diffusers.
_TORCHAO = _Path(__file__).resolve().parents[1] / ".venv" / "extras" / "torchao"
if importlib.util.find_spec("torchao") is None and _TORCHAO.is_dir():
    sys.path.insert(0, str(_TORCHAO))

import tdm  # noqa: E402,F401  (pins the CPU kernels' instruction set before torch runs any: tdm/__init__.py)
import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

TINY_CHANNELS = (32, 32)


@pytest.fixture(scope="session")
def tiny_digits():
    """A tiny, randomly initialised digits backbone (two 32-channel levels)."""
    from tdm.backbones import DigitsArch, DigitsBackbone

    return DigitsBackbone.create(DigitsArch(channels=TINY_CHANNELS, text_layers=1, num_merges=2000), seed=0)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory):
    """One metric-weights cache per test session (the digit classifier trains once, ~5 s)."""
    return tmp_path_factory.mktemp("weights")


from pathlib import Path  # noqa: E402


@pytest.fixture(scope="session")
def teacher_dir(tiny_digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "model"
    tiny_digits.save(folder)
    return folder


PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"  # the committed embedded default
