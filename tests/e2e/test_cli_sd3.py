"""`ditserve generate` on an SD3.5-Medium-style folder: the image equals the Python API's (skip-layer
guidance flags included); bad skip-layer input is one line with exit status 2."""

import numpy as np
import pytest
from PIL import Image

from ditserve.cli.main import main

SMALL = ["--height", "32", "--width", "48", "--num-inference-steps", "3", "--max-sequence-length", "16",
         "--guidance-scale", "4.0", "--seed", "5"]
SLG = ["--skip-guidance-layers", "1", "--skip-layer-guidance-start", "0", "--skip-layer-guidance-stop", "0.7"]


def test_generate_with_skip_layer_guidance_equals_python_api(tiny_sd3, tmp_path):
    from ditserve import Generator

    folder = tiny_sd3("sd35m")
    out = tmp_path / "lake.png"
    assert main(["generate", "--model-path", str(folder), "--prompt", "a lake", "--device", "cpu",
                 "--output", str(out), *SMALL, *SLG]) == 0
    api = Generator.from_pretrained(folder, device="cpu", dtype="float32").generate(
        "a lake", seed=5, height=32, width=48, num_inference_steps=3, max_sequence_length=16, guidance_scale=4.0,
        skip_guidance_layers=[1], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=0.7)
    assert np.array_equal(np.asarray(api.images[0]), np.asarray(Image.open(out).convert("RGB")))


@pytest.mark.parametrize("flags,needle", [
    (["--skip-guidance-layers", "9"], "skip_guidance_layers must be a non-empty list of block indices 0...2"),
    (["--skip-guidance-layers", "a,b"], "expected block indices like 7,8,9"),
    (["--skip-layer-guidance-scale", "-1"], "skip_layer_guidance_scale must be a finite number >= 0"),
    (["--height", "144"], "height must be between 16 and 128"),
])
def test_bad_input_is_one_line_exit_2(tiny_sd3, tmp_path, capsys, flags, needle):
    try:  # argparse's own errors exit from inside main
        rc = main(["generate", "--model-path", str(tiny_sd3("sd3")), "--prompt", "x", "--output",
                   str(tmp_path / "x.png"), "--num-inference-steps", "1", *flags])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
