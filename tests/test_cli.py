import json
import subprocess
import sys

import pytest

from unitok import __version__
from unitok.cli import main


def _unitok(*args):
    return subprocess.run([sys.executable, "-m", "unitok.cli", *args], capture_output=True, text=True, timeout=600)


def test_help_lists_subcommands_and_version():
    out = _unitok("--help")
    assert out.returncode == 0
    for cmd in ("data", "bench", "demo"):
        assert cmd in out.stdout
    version = _unitok("--version")
    assert version.returncode == 0 and __version__ in version.stdout


def test_data_info_json(tmp_path):
    path = tmp_path / "info.json"
    assert main(["data", "info", "--json", str(path)]) == 0
    info = json.loads(path.read_text())
    fm = info["fashion_mnist"]
    assert (fm["train"], fm["test"], fm["image_size"]) == (60000, 10000, [28, 28])
    assert fm["classes"][7] == "sneaker"
    assert info["visp"]["sequences"] == 5 and info["visp"]["frames"] == 501 + 218 + 80 + 50 + 33
    assert info["moving_fashion_mnist"]["clip_shape"] == [16, 64, 64]


@pytest.mark.slow
def test_bench_eval_json_meets_the_metric_requirements(tmp_path):
    path = tmp_path / "eval.json"
    assert main(["bench", "eval", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["n"] >= 5000
    assert result["classifier_test_acc"] >= 0.88
    assert result["fd_noise"] >= 10 * result["fd_train_vs_test"]
    assert result["fd_blur"] >= 10 * result["fd_train_vs_test"]
    assert result["passes"] is True


def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys):
    assert main(["bench", "eval", "--n", "100"]) == 2
    assert ">= 2000" in capsys.readouterr().err
    (tmp_path / "dir").mkdir()
    assert main(["data", "info", "--json", str(tmp_path / "dir")]) == 2
    assert "directory" in capsys.readouterr().err
    out = _unitok("bench")
    assert out.returncode == 2 and "SUITE" in out.stderr
