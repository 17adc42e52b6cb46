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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from grpo.modeling import init_model_dir

    return init_model_dir(tmp_path_factory.mktemp("tiny") / "model", **TINY)
