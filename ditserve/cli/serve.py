"""`ditserve serve`: an OpenAI-compatible image server; the model runs in a worker process."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ditserve.api import EngineError, InvalidRequest
from ditserve.cli.generate import accel_config, add_model_args, default_model_path

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve OpenAI's image API over HTTP")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000, help="0 picks a free port (logged at start)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (keeps it out of ps)")
    p.add_argument("--served-model-name", default=None,
                   help="the id in /v1/models and `model` (default: the model folder's name or the HF id)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get 429 (default 64)")
    p.add_argument("--max-batch-size", type=int, default=1,
                   help="most images in one pipeline call; compatible requests share it (default 1)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--drain-timeout", type=float, default=600.0,
                   help="on SIGTERM, seconds to wait for requests to finish (default 600)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="JSON body limit (default 1 MiB)")
    p.add_argument("--max-upload-bytes", type=int, default=32 << 20, help="multipart limit (default 32 MiB)")
    p.add_argument("--output-dir", default=None, help="where url outputs live (default: a fresh temp folder)")
    p.add_argument("--output-ttl", type=float, default=3600.0, help="seconds a url output lives (default 3600)")
    p.add_argument("--max-pixels", type=int, default=None, help="cap on width*height below the model's")
    p.add_argument("--max-steps", type=int, default=None, help="cap on num_inference_steps below the model's")
    p.add_argument("--max-num-images", type=int, default=None, help="cap on n below the model's")
    p.add_argument("--worker-threads", type=int, default=None, help="torch CPU threads in the worker")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before the socket opens or weights load.
    from ditserve.config import EngineConfig, ModelConfig, env, parse_device, parse_dtype
    from ditserve.config.server import ServerConfig
    from ditserve.runtime.loader import inspect_model

    model = default_model_path(args.model_path)
    source = inspect_model(model)
    device = parse_device(args.device)
    parse_dtype(args.dtype, device)
    if args.max_batch_size < 1:
        raise InvalidRequest(f"--max-batch-size must be at least 1, got {args.max_batch_size}", "max_batch_size")
    config = ServerConfig(
        host=args.host, port=args.port, api_key=_api_key(args), served_model_name=args.served_model_name,
        max_queue=args.max_queue, request_timeout_s=args.request_timeout, drain_timeout_s=args.drain_timeout,
        max_body_bytes=args.max_body_bytes, max_upload_bytes=args.max_upload_bytes, output_dir=args.output_dir,
        output_ttl_s=args.output_ttl, max_pixels=args.max_pixels, max_steps=args.max_steps,
        max_num_images=args.max_num_images, worker_threads=args.worker_threads,
    )
    engine = EngineConfig(ModelConfig(str(source.path), device, args.dtype), max_batch_size=args.max_batch_size,
                          accel=accel_config(args))
    model_id = args.served_model_name or (Path(model).name if Path(model).expanduser().is_dir() else model)

    from ditserve.server.app import create_app
    from ditserve.server.runner import bind, serve

    sock = bind(config.host, config.port)
    app = create_app(source, model_id, engine, config, log_level=env.log_level())
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info("ditserve serving %s (%s) on http://%s:%d", model_id, source.class_name, shown, port)
    if config.api_key is None and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", host)
    fatal = serve(app, app.state.ditserve, sock)
    if fatal:
        raise EngineError(f"the model could not be loaded: {fatal}")
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    if args.api_key and args.api_key_file:
        raise InvalidRequest("give --api-key or --api-key-file, not both", "api_key")
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except OSError as exc:
            raise InvalidRequest(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror}",
                                 "api_key_file") from None
        if not key:
            raise InvalidRequest(f"--api-key-file {args.api_key_file} is empty", "api_key_file")
        return key
    return args.api_key or None
