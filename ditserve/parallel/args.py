"""Command-line flags of the parallel engine (for `ditserve generate` and `ditserve serve`), and the
torchrun command that starts the ranks of one machine of a multi-machine group."""

from __future__ import annotations

import argparse
import shlex
import sys

from ditserve.config import ParallelConfig


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """The parallel flags; `parallel_config_from_args` turns them into a ParallelConfig."""
    g = parser.add_argument_group("parallel (one request over several GPUs; CPU processes where there is none)")
    g.add_argument("--num-gpus", type=int, metavar="N", default=None,
                   help="GPUs (ranks) in all; must equal the product of the degrees below x --num-replicas "
                        "(default: that product)")
    g.add_argument("--enable-cfg-parallel", action="store_true",
                   help="run the conditional and unconditional branches of CFG on two ranks")
    g.add_argument("--ulysses-degree", type=int, metavar="N", default=1,
                   help="sequence parallel by all-to-all between tokens and heads (divides the heads)")
    g.add_argument("--ring-degree", type=int, metavar="N", default=1, help="sequence parallel by passing K/V round a ring")
    g.add_argument("--tp-size", type=int, metavar="N", default=1, help="tensor parallel: each rank holds 1/N of the DiT")
    g.add_argument("--num-replicas", type=int, metavar="N", default=1, help="independent engine replicas (throughput)")
    g.add_argument("--vae-parallel", action="store_true", help="video: split the VAE decode across the ranks")
    g.add_argument("--nnodes", type=int, metavar="N", default=1, help="machines in the group (ranks there start under torchrun)")
    g.add_argument("--node-rank", type=int, metavar="N", default=0, help="this machine's index (0: the one that serves)")
    g.add_argument("--master-addr", metavar="HOST", default="127.0.0.1", help="address of machine 0 (torchrun rendezvous)")
    g.add_argument("--master-port", type=int, metavar="N", default=29500,
                   help="torchrun rendezvous port on machine 0; the engine waits for rank 0 on the next port")
    g.add_argument("--auth-key-file", metavar="FILE", default=None,
                   help="several machines: a secret file every machine reads, at least 16 bytes (default: none)")


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    """A validated ParallelConfig; InvalidRequest (one line naming the numbers) otherwise."""
    cfg_degree = 2 if args.enable_cfg_parallel else 1
    product = cfg_degree * args.ulysses_degree * args.ring_degree * args.tp_size * args.num_replicas
    return ParallelConfig(
        num_gpus=product if args.num_gpus is None else args.num_gpus, cfg_parallel=args.enable_cfg_parallel,
        ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree, tp_size=args.tp_size,
        num_replicas=args.num_replicas, nnodes=args.nnodes, node_rank=args.node_rank, master_addr=args.master_addr,
        master_port=args.master_port, auth_key_file=args.auth_key_file, vae_parallel=args.vae_parallel)


def torchrun_command(cfg: ParallelConfig, node_rank: int | None = None, python: str | None = None) -> list[str]:
    """The command that starts this machine's ranks of a multi-machine group (run it on every
    machine, with its --node-rank; machine 0 also runs the server with the same parallel flags):

        python -m torch.distributed.run --nnodes 2 --node-rank 1 --nproc-per-node 8 \\
            --master-addr 10.0.0.1 --master-port 29500 -m ditserve.runtime.ranks \\
            --driver 10.0.0.1:29501 --auth-key-file /secrets/ditserve.key
    """
    node = cfg.node_rank if node_rank is None else node_rank
    return [python or sys.executable, "-m", "torch.distributed.run", "--nnodes", str(cfg.nnodes),
            "--node-rank", str(node), "--nproc-per-node", str(cfg.num_gpus // cfg.nnodes),
            "--master-addr", cfg.master_addr, "--master-port", str(cfg.master_port),
            "-m", "ditserve.runtime.ranks", "--driver", f"{cfg.master_addr}:{cfg.master_port + 1}",
            "--auth-key-file", str(cfg.auth_key_file)]


def main(argv: list[str] | None = None) -> None:
    """`python -m ditserve.parallel.args --nnodes 2 ... --node-rank 1` prints the torchrun command."""
    parser = argparse.ArgumentParser(prog="python -m ditserve.parallel.args",
                                     description="print the torchrun command for one machine of a group")
    add_parallel_arguments(parser)
    sys.stdout.write(shlex.join(torchrun_command(parallel_config_from_args(parser.parse_args(argv)))) + "\n")


if __name__ == "__main__":
    main()
