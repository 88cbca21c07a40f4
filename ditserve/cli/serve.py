"""`ditserve serve`: an OpenAI-compatible image or video server; the model runs in a worker process."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ditserve.api import EngineError, InvalidRequest
from ditserve.cli.engine_args import add_engine_args, engine_config

log = logging.getLogger(__name__)

DEMO_MODEL_ID = "ditserve-demo"  # the id the bundled demo model is served under


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve OpenAI's Images API (image models) or Videos API (video models) "
                                     "over HTTP")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000, help="0 picks a free port (logged at start)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/")
    p.add_argument("--api-key-file", default=None, help="read the API key from this file (keeps it out of ps)")
    p.add_argument("--served-model-name", default=None,
                   help="the id in /v1/models and `model` (default: the model folder's name or the HF id; "
                        f"{DEMO_MODEL_ID} for the bundled demo model, ditserve-demo-video for the video demo)")
    _add_network_args(p)
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get 429 (default 64)")
    p.add_argument("--max-client-requests", type=int, default=None,
                   help="requests one client address may have queued or running; more get 429 "
                        "(default: a quarter of --max-queue)")
    p.add_argument("--max-batch-size", type=int, default=1,
                   help="most images in one pipeline call; compatible requests share it (default 1)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--drain-timeout", type=float, default=600.0,
                   help="on SIGTERM, seconds to wait for requests to finish (default 600)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="JSON body limit (default 1 MiB)")
    p.add_argument("--max-upload-bytes", type=int, default=32 << 20, help="multipart limit (default 32 MiB)")
    p.add_argument("--output-dir", default=None, help="where url outputs live (default: a fresh temp folder)")
    p.add_argument("--output-ttl", type=float, default=3600.0, help="seconds a url output lives (default 3600)")
    p.add_argument("--output-max-bytes", type=int, default=1 << 30,
                   help="disk the url outputs may use; the oldest are deleted first (default 1 GiB)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="cap on width*height (default: 4x the model's default image area)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap on num_inference_steps (default: 4x the model's default steps, at least 50)")
    p.add_argument("--max-num-images", type=int, default=None, help="cap on n (default 4)")
    p.add_argument("--worker-threads", type=int, default=None, help="torch CPU threads in the worker")
    p.add_argument("--data-dir", default=None,
                   help="video models: where /v1/videos jobs and their files live (default ~/.cache/ditserve/jobs)")
    p.add_argument("--job-timeout", type=float, default=3600.0, help="seconds one video job may run (default 3600)")
    p.add_argument("--data-max-bytes", type=int, default=10 << 30,
                   help="disk the video jobs' files may use; the oldest finished jobs are deleted first "
                        "(default 10 GiB)")
    p.set_defaults(run=run)


def _add_network_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host header names served (.example.com: and its subdomains; *: any); "
                        "IP addresses always pass (default: the --host name and localhost)")
    p.add_argument("--public-url", default=None,
                   help="the URL clients reach this server at (e.g. behind a proxy); url outputs use it")
    p.add_argument("--forwarded-allow-ips", default="127.0.0.1",
                   help="proxies whose X-Forwarded-For names the client, comma-separated (default 127.0.0.1)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections; more get 503 at once (default 256)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers; then 408 (default 10)")


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong is checked before the socket opens or weights load.
    from ditserve.config import env, parse_device, parse_dtype
    from ditserve.runtime.loader import inspect_model

    model, demo_id = _model_path(args.model_path)
    source = inspect_model(model)
    device = parse_device(args.device)
    parse_dtype(args.dtype, device)
    if args.max_batch_size < 1:
        raise InvalidRequest(f"--max-batch-size must be at least 1, got {args.max_batch_size}", "max_batch_size")
    config = _server_config(args)
    engine = engine_config(args, str(source.path), max_batch_size=args.max_batch_size)
    model_id = args.served_model_name or demo_id or (Path(model).name if Path(model).expanduser().is_dir() else model)

    from ditserve.server.app import create_app
    from ditserve.server.runner import bind, serve

    config.limits_for(source.limits, source.defaults)  # refuses caps that no request could meet
    sock = bind(config.host, config.port)
    app = create_app(source, model_id, engine, config, log_level=env.log_level())
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info("ditserve serving %s (%s) on http://%s:%d", model_id, source.class_name, shown, port)
    _log_policy(app.state.ditserve)
    fatal = serve(app, app.state.ditserve, sock)
    if fatal:
        raise EngineError(f"the model could not be loaded: {fatal}")
    return 0


def _server_config(args: argparse.Namespace):
    from ditserve.config.server import ServerConfig

    hosts = None if args.allowed_hosts is None else tuple(args.allowed_hosts.split(","))
    return ServerConfig(
        host=args.host, port=args.port, api_key=_api_key(args), served_model_name=args.served_model_name,
        max_queue=args.max_queue, request_timeout_s=args.request_timeout, drain_timeout_s=args.drain_timeout,
        max_body_bytes=args.max_body_bytes, max_upload_bytes=args.max_upload_bytes, output_dir=args.output_dir,
        output_ttl_s=args.output_ttl, output_max_bytes=args.output_max_bytes, max_pixels=args.max_pixels,
        max_steps=args.max_steps, max_num_images=args.max_num_images,
        max_client_requests=args.max_client_requests, max_connections=args.max_connections,
        header_timeout_s=args.header_timeout, allowed_hosts=hosts, public_url=args.public_url,
        forwarded_allow_ips=args.forwarded_allow_ips, worker_threads=args.worker_threads,
        data_dir=args.data_dir, job_timeout_s=args.job_timeout, data_max_bytes=args.data_max_bytes,
    )


def _model_path(given: str | None) -> tuple[str, str | None]:
    """`--model-path` (a bundled demo's name: its folder), else $DITSERVE_DEFAULT_MODEL, else the bundled
    (image) demo model; and the demo's served id when it is a bundled demo."""
    from ditserve import demo
    from ditserve.config import env

    if given:
        path = str(demo.resolve_name(given))
        return path, (demo.IMAGE_NAME if demo.is_demo(path) else demo.VIDEO_NAME if demo.is_video_demo(path) else None)
    if env.demo_model_path():
        return env.demo_model_path(), None
    bundled = demo.model_path()
    if bundled is None:
        raise InvalidRequest("--model-path is required (the bundled demo model is not installed)", "model")
    log.info("no --model-path: serving the bundled demo model as %r (64x64 shapes; try %r); for the video demo "
             "on /v1/videos run `ditserve serve --model-path %s`", DEMO_MODEL_ID, demo.EXAMPLE_PROMPT, demo.VIDEO_NAME)
    return str(bundled), DEMO_MODEL_ID


def _log_policy(state) -> None:
    """What an operator should check at start: limits, Host policy, exposure."""
    cfg, limits, defaults = state.config, state.limits, state.defaults
    log.info("limits: %d pixels (default %dx%d), %d steps (default %d), n <= %d, %d per client, %d queued, "
             "%d connections", limits.max_pixels, defaults.width, defaults.height, limits.max_steps,
             defaults.num_inference_steps, limits.max_num_images, cfg.client_limit, cfg.max_queue,
             cfg.max_connections)
    if state.jobs is not None:
        log.info("video jobs: in %s, kept %g s, at most %d bytes (oldest finished deleted first), %g s each "
                 "once running", state.jobs.root, cfg.output_ttl_s, cfg.data_max_bytes, cfg.job_timeout_s)
    hosts = cfg.host_allow_list()
    log.info("Host header: %s", "any (--allowed-hosts *)" if hosts is None else
             ", ".join(sorted(hosts)) + " or an IP address")
    if cfg.api_key is None and cfg.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("listening on %s without --api-key: anyone who can reach it can use it", cfg.host)


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
