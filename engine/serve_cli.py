"""`nti serve` flags. Kept apart from engine/serve.py so the core CLI parses without FastAPI installed."""
from __future__ import annotations

import argparse
import os

from .config import NTIError
from .options import int_at_least, positive_int


def finite_float_above(low: float, inclusive: bool):
    """argparse type: a finite number > low (>= low if inclusive); nan, inf or a value below broke the batcher's
    clock or the Ray autoscaler's arithmetic."""
    relation = ">=" if inclusive else ">"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not (value >= low if inclusive else value > low) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number {relation} {low:g}, got {text!r}")
        return value
    return parse


positive_float = finite_float_above(0, inclusive=False)
non_negative_float = finite_float_above(0, inclusive=True)  # a wait of 0 means none


def port_number(text: str) -> int:
    """A TCP port, 0..65535 (0: any free port). Past 65535 the socket layer wrapped it to another port."""
    port = int_at_least(0)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port in 0..65535, got {port}")
    return port


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="HTTP backend: OpenAI-compatible /v1/images/edits and the native inversion API "
                       "(needs the serve extra: pip install -e '.[serve]')")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8000)
    p.add_argument("--data", default="nti-serve-data", help="folder for the job table (SQLite) and artifacts; "
                   "a restart re-runs the jobs it holds that were accepted but not finished")
    p.add_argument("--model", default=None, help="as for the other commands (default: the built-in shapes model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=positive_int, default=8, help="most jobs in one fast-path batch")
    p.add_argument("--max-delay-ms", type=non_negative_float, default=50.0, help="how long the oldest job waits for "
                   "a batch to fill before it runs with what is there")
    p.add_argument("--max-queue", type=positive_int, default=256, help="queued jobs before 429 + Retry-After")
    p.add_argument("--request-timeout", type=positive_float, default=600.0,
                   help="seconds a waiting request waits at most")
    p.add_argument("--token", default=None, help="bearer token required on every route but /healthz, /readyz and "
                   "the page (default: $NTI_SERVE_TOKEN; none: no auth)")
    p.add_argument("--max-upload-bytes", type=positive_int, default=10 * 2**20)
    p.add_argument("--max-pixels", type=positive_int, default=4096 * 4096, help="decoded image size limit")
    p.add_argument("--max-prompt-chars", type=positive_int, default=500)
    p.add_argument("--max-steps", type=positive_int, default=100)
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps of requests that do not say")
    p.add_argument("--inner-steps", type=int_at_least(0), default=10, help="Adam iterations per step of requests "
                   "that do not say")
    p.add_argument("--drain", type=non_negative_float, default=30.0,
                   help="seconds a shutdown keeps batching queued jobs")
    p.add_argument("--quiet", action="store_true", help="warnings and errors only in the log")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)  # read by the CLI's interrupt message
    g = p.add_argument_group("on a Ray cluster (pip install -e '.[ray]'; docs/serving.md)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="serve as a Ray Serve application: ADDRESS of the cluster's head (e.g. auto, 10.0.0.1:6379), "
                   "or none to start a local cluster; run it on a node of the cluster (--data lives there)")
    g.add_argument("--min-replicas", type=positive_int, default=1, help="engine replicas always up (default 1)")
    g.add_argument("--max-replicas", type=positive_int, default=None, help="most engine replicas when autoscaling "
                   "(default: one per GPU of the cluster; on CPU --min-replicas)")
    g.add_argument("--target-ongoing-requests", type=positive_float, default=None, help="jobs per replica that "
                   "Ray Serve's autoscaler aims at (default: --batch-size)")
    g.add_argument("--replica-cpus", type=positive_float, default=1.0, help="CPUs (torch threads) of each CPU "
                   "replica (default 1; a GPU replica takes 1 CPU and 1 GPU)")


RAY_DEFAULTS = {"min_replicas": 1, "max_replicas": None, "target_ongoing_requests": None, "replica_cpus": 1.0}


def run_serve(args) -> int:
    ray_only = [f"--{name.replace('_', '-')}" for name, default in RAY_DEFAULTS.items()
                if getattr(args, name) != default]
    if args.ray is None and ray_only:
        raise NTIError(f"{', '.join(ray_only)} only apply with --ray (engine replicas on a Ray cluster)")
    if args.steps > args.max_steps:  # requests that name no steps would run past the limit the others are held to
        raise NTIError(f"--steps {args.steps} is over --max-steps {args.max_steps}; lower --steps or raise --max-steps")
    try:
        from .serve import ServeSettings, is_loopback, serve
    except ImportError as err:
        raise NTIError(f"nti serve needs the serve extra ({err.name} is missing): pip install -e '.[serve]'") from None
    settings = ServeSettings(
        data=args.data, model=args.model, device=args.device, batch_size=args.batch_size,
        max_delay_ms=args.max_delay_ms, max_queue=args.max_queue, request_timeout_s=args.request_timeout,
        token=args.token or os.environ.get("NTI_SERVE_TOKEN") or None, max_upload_bytes=args.max_upload_bytes,
        max_pixels=args.max_pixels, max_prompt_chars=args.max_prompt_chars, max_steps=args.max_steps,
        steps=args.steps, inner_steps=args.inner_steps, drain_s=args.drain, local_only=is_loopback(args.host))
    if args.ray is not None:
        try:
            from .serve_ray import Scaling, serve_on_ray
        except ImportError as err:
            raise NTIError(f"nti serve --ray needs Ray Serve ({err.name} is missing): pip install -e '.[ray]'") \
                from None
        scaling = Scaling(args.min_replicas, args.max_replicas, args.target_ongoing_requests, args.replica_cpus)
        return serve_on_ray(settings, args.host, args.port, args.ray, scaling, args.quiet)
    check_listen(args.host, args.port)
    serve(settings, args.host, args.port)
    return 0


def check_listen(host: str, port: int) -> None:
    """Bind host:port once before serving: a port in use, or an address that is not this machine's, is bad input (one
    line, exit 2), not uvicorn's log line and exit 3 after the model has loaded."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
            sock.bind(address)
    except OSError as err:
        raise NTIError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --port, or a --host "
                       f"address of this machine") from None
