"""Several machines: the ranks run under torchrun (one launch per machine, `--nnodes 2 --node-rank
i`), the engine waits for rank 0 at master_port + 1 and drives them as it drives local ranks. Here
the two "machines" are two launches on this host, one CPU rank each, over gloo."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import ditserve
from ditserve.api import GenerationRequest
from ditserve.config import EngineConfig, ModelConfig, ParallelConfig
from ditserve.parallel.args import torchrun_command
from ditserve.runtime.executor import ParallelEngine

REQUEST = dict(prompt="a red fox in the snow", negative_prompt="blurry, low quality", seed=3, height=48, width=80,
               num_inference_steps=3, true_cfg_scale=4.0)
ROOT = Path(ditserve.__file__).resolve().parents[1]


def free_port_pair() -> int:
    """A port p with p + 1 also free now (the test's choice; the engine itself binds OS-chosen ports
    wherever it starts the ranks)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65534:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port pair")


def test_two_torchrun_launches_serve_the_single_process_pixels(tiny_qwen_image, reference, tmp_path):
    key = tmp_path / "ditserve.key"
    key.write_bytes(os.urandom(32).hex().encode())
    parallel = ParallelConfig(num_gpus=2, ulysses_degree=2, nnodes=2, master_addr="127.0.0.1",
                              master_port=free_port_pair(), auth_key_file=str(key))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    launches = [subprocess.Popen(torchrun_command(parallel, node_rank=node) + ["--threads", "1"], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    engine = None
    try:
        engine = ParallelEngine.start(EngineConfig(ModelConfig(str(tiny_qwen_image), "cpu", "float32"),
                                                   parallel=parallel))
        assert engine.ready and engine.executors[0].pids == []  # it started no process itself
        got = np.asarray(engine.generate(GenerationRequest(**REQUEST)).images[0])
        expected = reference(tiny_qwen_image, REQUEST)
        assert expected.std() > 10 and np.abs(got.astype(int) - expected.astype(int)).max() <= 1
        engine.close()
        engine = None
        codes = [launch.wait(120) for launch in launches]
        logs = [launch.stdout.read() for launch in launches]
        assert codes == [0, 0], "\n".join(logs)
    finally:
        if engine is not None:
            engine.close()
        for launch in launches:
            launch.kill()
            launch.wait()
