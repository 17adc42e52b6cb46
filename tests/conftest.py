"""Shared fixtures: one CPU thread (tiny models gain nothing from more, and CI shares its
two cores with nothing else to win), and a tiny saved model directory."""

import pytest
import torch

torch.set_num_threads(1)

DEVICES = [
    pytest.param("cpu"),
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]
"""Equivalence tests run on every device present: the CPU always, a GPU where there is one."""

TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64}


@pytest.fixture(autouse=True)
def _auto_device_is_the_cpu(monkeypatch):
    """On a machine with a GPU, ``model.device=auto`` means the CPU in tests (their
    hand-built batches are CPU tensors); tests over ``DEVICES`` ask for cuda by name, and
    child processes see no GPU. A no-op without CUDA."""
    if not torch.cuda.is_available():
        return
    from grpo import runtime

    resolve = runtime.resolve_device
    monkeypatch.setattr(
        runtime,
        "resolve_device",
        lambda setting, local_rank=0: resolve("cpu" if setting == "auto" else setting, local_rank),
    )
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from grpo.modeling import init_model_dir

    return init_model_dir(tmp_path_factory.mktemp("tiny") / "model", **TINY)
