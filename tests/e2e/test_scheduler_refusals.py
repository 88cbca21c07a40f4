"""A folder whose scheduler config asks for math ditserve does not implement is refused with one
line, before any weights load (CLI exit 2, Python InvalidRequest); never a quietly different image."""

import json
import shutil
import subprocess
import sys

import pytest

from ditserve.api import InvalidRequest
from ditserve.cli.main import main
from ditserve.runtime.loader import inspect_model


def with_scheduler(src, dst, **changes):
    shutil.copytree(src, dst)
    file = dst / "scheduler" / "scheduler_config.json"
    cfg = json.loads(file.read_text()) | changes
    file.write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, named, process", [
    ({"use_karras_sigmas": True}, "use_karras_sigmas", True),
    ({"stochastic_sampling": True}, "stochastic_sampling", False),
    ({"_class_name": "EulerAncestralDiscreteScheduler"}, "EulerAncestralDiscreteScheduler", False),
])
def test_unsupported_scheduler_is_one_line_exit_2(tiny_flux_schnell, tmp_path, changes, named, process, capsys):
    """The first case as a real process; the others through the CLI's `main` in this one (the same code,
    without a fresh interpreter's start-up)."""
    folder = with_scheduler(tiny_flux_schnell, tmp_path / "m", **changes)
    args = ["generate", "--model-path", str(folder), "--prompt", "a fox", "--output", str(tmp_path / "x.png")]
    if process:
        res = subprocess.run([sys.executable, "-m", "ditserve.cli.main", *args],
                             capture_output=True, text=True, timeout=120)
        rc, err = res.returncode, res.stderr
    else:
        capsys.readouterr()
        rc, err = main(args), capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(InvalidRequest, match=named):
        inspect_model(folder)


def test_harmless_scheduler_keys_still_load(tiny_qwen_image, tmp_path):
    """Keys that cannot change the math as the pipeline drives the scheduler are accepted."""
    folder = with_scheduler(tiny_qwen_image, tmp_path / "m", _diffusers_version="0.99.0", some_future_key=1)
    assert inspect_model(folder).class_name == "QwenImagePipeline"


@pytest.mark.parametrize("changes, named", [
    ({"use_karras_sigmas": True}, "use_karras_sigmas=true"),
    ({"stochastic_sampling": True}, "stochastic_sampling=true"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas=true"),
    ({"invert_sigmas": True}, "invert_sigmas=true"),
    ({"_class_name": "FlowMatchHeunDiscreteScheduler"}, "FlowMatchHeunDiscreteScheduler"),
])
def test_qwen_image_folder_asking_for_other_math_is_refused_in_one_line(tiny_qwen_image, tmp_path, changes, named):
    """Qwen-Image's scheduler config writes these keys out, all off; turned on, each is refused before loading."""
    folder = with_scheduler(tiny_qwen_image, tmp_path / "m", **changes)
    with pytest.raises(InvalidRequest, match=named) as info:
        inspect_model(folder)
    assert "\n" not in str(info.value)
