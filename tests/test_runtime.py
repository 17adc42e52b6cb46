"""The Runtime: device resolution before any loading, and the single-process no-op case."""

import pytest
import torch

from grpo.cli import main
from grpo.config import ConfigError, build_config
from grpo.runtime import Runtime, resolve_device
from grpo.trainer import GRPOTrainer

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want


@no_cuda
@pytest.mark.parametrize("setting", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_refused_naming_the_field(setting):
    with pytest.raises(ConfigError, match=rf"model.device = '{setting}': no CUDA device"):
        resolve_device(setting)


def test_config_rejects_an_unknown_device():
    with pytest.raises(ConfigError, match=r"model.device = 'gpu'"):
        build_config(overrides=["model.device=gpu"])


@no_cuda
def test_trainer_refuses_cuda_before_loading_anything(tmp_path):
    cfg = build_config(
        overrides=[f"model.name_or_path={tmp_path / 'does-not-exist'}", "model.device=cuda"]
    )
    with pytest.raises(ConfigError, match=r"model\.device"):  # not an error about the path
        GRPOTrainer(cfg)


@no_cuda
def test_cli_says_it_in_one_line(tmp_path, capsys):
    code = main(["train", f"run.output_dir={tmp_path}", "model.device=cuda"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "model.device = 'cuda'" in err and "Traceback" not in err


def test_one_process_collectives_are_the_identity():
    rt = Runtime(torch.device("cpu"))
    x = torch.tensor([1.0, 2.0])
    assert rt.all_reduce(x) is x and x.tolist() == [1.0, 2.0]
    assert rt.gather_objects({"a": 1}) == [{"a": 1}]
    assert rt.is_main and not rt.distributed
    rt.barrier()
