"""Reference server for :class:`~critic_align.rewards.remote.RemoteReward`: any reward over HTTP.

Run it from the command line with a reward of the registry (``train/registry.py``)::

    python -m critic_align.rewards.remote_server --port 8765 --reward jpeg_compressibility
    python -m critic_align.rewards.remote_server --port 8765 --reward aesthetic \\
        --reward-kwargs '{"head": "/models/aesthetic_head.safetensors", "model": "/models/clip-vit-large-patch14"}'

and point a training config at it (``rewards: [{name: remote, url: "http://127.0.0.1:8765"}]``).
From Python, :func:`make_server` serves any :class:`~critic_align.rewards.base.Reward` object (a
detector pipeline wrapped in a ``FunctionReward``, say).

The protocol is the one documented in :mod:`critic_align.rewards.remote`: ``POST`` (any path) a JSON
batch, get ``{"scores": [...]}`` (NaN scores as ``null``); a malformed request gets status 400 and a
failing reward 500, both with ``{"error": "..."}``.  ``GET`` (any path) answers
``{"reward": name, "protocol": 1}`` as a health check.

The server listens on 127.0.0.1 only: it has no authentication and no TLS, so it is meant for
processes on the same machine (reach it from another machine through an SSH tunnel, or put your own
server behind a proper front end).  It handles connections in a bounded pool of ``workers`` threads;
a connection arriving while all of them are busy and ``backlog`` more are queued is answered 503 at
once (the client retries 503 with backoff).  Every connection has ``connection_timeout`` seconds from its
arrival (time spent waiting in the queue included) to deliver its whole request, so stalled or trickling
uploads are shed together: a queue full of them is empty about one ``connection_timeout`` after they came (a
connection reaching a worker after its deadline still gets a short grace to hand over a request it already
sent), and a real request gets through.  The reward object is called under a lock, one batch at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer

from critic_align.rewards.base import Reward, RewardError
from critic_align.rewards.remote import PROTOCOL_VERSION, decode_images

__all__ = ["HOST", "make_server", "main"]

HOST = "127.0.0.1"
DEFAULT_MAX_REQUEST_MB = 256
DEFAULT_WORKERS = 4
DEFAULT_BACKLOG = 16
DEFAULT_CONNECTION_TIMEOUT = 60.0
log = logging.getLogger(__name__)


class _BadRequest(ValueError):
    pass


def _parse_request(body: bytes):
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _BadRequest(f"the request body is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise _BadRequest(f"the request must be a JSON object, got {type(data).__name__}")
    missing = [k for k in ("encoding", "shape", "prompts", "images") if k not in data]
    if missing:
        raise _BadRequest(f"the request lacks {missing}; see critic_align.rewards.remote for the protocol")
    if data.get("protocol", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise _BadRequest(f"unsupported protocol {data['protocol']!r}; this server speaks {PROTOCOL_VERSION}")
    prompts = data["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _BadRequest("'prompts' must be a list of strings")
    try:
        samples = decode_images(data["images"], data["encoding"], data["shape"])
    except ValueError as exc:
        raise _BadRequest(str(exc)) from exc
    if len(prompts) != samples.shape[0]:
        raise _BadRequest(f"got {len(prompts)} prompts for {samples.shape[0]} images")
    return samples, prompts


class PooledHTTPServer(HTTPServer):
    """An HTTPServer that handles connections in a fixed pool of threads, with at most ``backlog`` waiting:
    a connection beyond that is answered ``503`` and closed at once, so stalled clients cannot make the
    server start a thread per connection."""

    request_queue_size = 128  # the kernel's accept queue: connections beyond the pool must be seen to be refused

    def __init__(self, address, handler, workers: int = DEFAULT_WORKERS, backlog: int = DEFAULT_BACKLOG):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(workers + backlog)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reward-server")
        self.arrival = threading.local()  # .t: when the connection a worker handles was accepted (monotonic)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            body = json.dumps({"error": "the reward server is busy (all workers and the queue are taken); retry "
                                        "later"}).encode()
            try:
                request.setblocking(False)
                try:  # read what the client already sent: closing with unread data would reset the connection
                    while request.recv(1 << 16):  # and could discard the 503 before the client reads it
                        pass
                except OSError:
                    pass
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self._pool.submit(self._work, request, client_address, time.monotonic())

    def _work(self, request, client_address, arrived: float | None = None):
        self.arrival.t = time.monotonic() if arrived is None else arrived
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def server_close(self):
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_server(reward: Reward, port: int = 0, max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
                workers: int = DEFAULT_WORKERS, backlog: int = DEFAULT_BACKLOG,
                connection_timeout: float = DEFAULT_CONNECTION_TIMEOUT) -> PooledHTTPServer:
    """An HTTP server on ``127.0.0.1:port`` (``port=0``: a free port, see ``server.server_address``)
    that scores batches with ``reward``.  Call ``serve_forever()`` (e.g. in a thread), then
    ``shutdown()`` and ``server_close()``.  Requests above ``max_request_mb`` are refused (413);
    ``workers`` threads serve connections, ``backlog`` more may wait (beyond: 503); a connection gets
    ``connection_timeout`` seconds per socket operation and for reading its whole request (beyond: 408)."""
    if not isinstance(reward, Reward):
        raise TypeError(
            f"make_server needs a Reward, got {type(reward).__name__}; wrap a function in FunctionReward(fn, name=...)"
        )
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an int in 0..65535, got {port!r}")
    for name, v in (("workers", workers), ("backlog", backlog)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "workers" else 0):
            raise ValueError(f"{name} must be an int >= {1 if name == 'workers' else 0}, got {v!r}")
    if not isinstance(connection_timeout, (int, float)) or not 0 < connection_timeout < math.inf:
        raise ValueError(f"connection_timeout must be a positive number of seconds, got {connection_timeout!r}")
    max_bytes = int(float(max_request_mb) * 2**20)
    lock = threading.Lock()
    reward_name = reward._display_name

    class Handler(BaseHTTPRequestHandler):
        server_version = "critic_align-reward/1"
        timeout = connection_timeout  # per socket operation (StreamRequestHandler sets it on the connection)

        def log_message(self, format, *args):  # noqa: A002 (the base class's signature)
            log.info("%s %s", self.address_string(), format % args)

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload, allow_nan=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def setup(self):
            super().setup()
            # a deadline for receiving the whole request (headers and body), from the connection's arrival:
            # per-operation timeouts alone let a client trickling a byte per second hold a worker indefinitely, and
            # a deadline from the worker's start would let a queue of stalled uploads hold every worker in turn.
            # A connection already past its deadline gets a short grace (a request it sent is in the buffer).
            # Cancelled once the request is in.
            arrived = getattr(self.server.arrival, "t", None) if hasattr(self.server, "arrival") else None
            now = time.monotonic()
            grace = min(0.05, connection_timeout)
            self._deadline = max((arrived if arrived is not None else now) + connection_timeout, now + grace)
            self._cutoff = threading.Timer(self._deadline - now, self._cut)
            self._cutoff.daemon = True
            self._cutoff.start()

        def _cut(self):
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def finish(self):
            self._cutoff.cancel()
            try:
                super().finish()
            except OSError:
                pass

        def _read_body(self, n: int) -> bytes | None:
            """The body, read within the connection's deadline (None if it passed): per-read timeouts alone
            would let a client trickling a byte per second hold this worker indefinitely."""
            deadline = self._deadline
            parts, left = [], n
            while left:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.connection.settimeout(remaining)
                try:
                    chunk = self.rfile.read1(min(left, 1 << 16))
                except (TimeoutError, OSError):
                    return None
                if not chunk:
                    return None
                parts.append(chunk)
                left -= len(chunk)
            return b"".join(parts)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._cutoff.cancel()
            self._send(200, {"reward": reward_name, "protocol": PROTOCOL_VERSION})

        def do_POST(self):  # noqa: N802
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._send(411, {"error": "a Content-Length header is required"})
                return
            if int(length) > max_bytes:
                self._send(413, {"error": f"request of {int(length)} bytes exceeds the server's limit of {max_bytes}"})
                return
            body = self._read_body(int(length))
            self._cutoff.cancel()  # the request is in: scoring may take as long as the reward needs
            if body is None:
                try:
                    self._send(408, {"error": f"the request body did not arrive within {connection_timeout:g} s"})
                except OSError:  # the connection was already cut at the deadline
                    pass
                return
            try:
                samples, prompts = _parse_request(body)
            except _BadRequest as exc:
                self._send(400, {"error": f"bad request: {exc}"})
                return
            try:
                with lock:
                    values = reward(samples, prompts)
                scores = [None if math.isnan(v) else float(v) for v in values.detach().float().cpu().tolist()]
            except Exception as exc:  # the reward failed (a RewardError naming it): tell the client why
                log.exception("reward %r failed", reward_name)
                self._send(500, {"error": str(exc) if isinstance(exc, RewardError) else f"{type(exc).__name__}: {exc}"})
                return
            try:
                self._send(200, {"scores": scores})
            except OSError:  # the client gave up waiting (its own deadline) and closed the connection
                log.info("%s left before its scores were sent", self.address_string())

    return PooledHTTPServer((HOST, port), Handler, workers=workers, backlog=backlog)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m critic_align.rewards.remote_server",
        description="Serve a critic_align reward over HTTP on 127.0.0.1 (protocol: critic_align.rewards.remote).",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1 only)")
    parser.add_argument("--reward", required=True, help="a reward name of train/registry.py, e.g. jpeg_compressibility")
    parser.add_argument("--reward-kwargs", default="{}", help='JSON object of constructor options, e.g. \'{"quality": 90}\'')
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                        help="refuse larger requests (default %(default)s)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="threads serving connections")
    parser.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG,
                        help="connections that may wait for a worker; more are answered 503 (default %(default)s)")
    parser.add_argument("--connection-timeout", type=float, default=DEFAULT_CONNECTION_TIMEOUT,
                        help="seconds per socket operation and for a whole request body (default %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    try:
        kwargs = json.loads(args.reward_kwargs)
    except json.JSONDecodeError as exc:
        parser.error(f"--reward-kwargs is not valid JSON ({exc})")
    if not isinstance(kwargs, dict):
        parser.error("--reward-kwargs must be a JSON object")
    if args.reward == "remote":
        parser.error("serving the 'remote' reward would forward to another server; serve the reward itself")

    from critic_align.registry import reward_by_name

    try:
        reward = reward_by_name(args.reward, **kwargs)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    try:
        server = make_server(reward, args.port, args.max_request_mb, args.workers, args.backlog,
                             args.connection_timeout)
    except ValueError as exc:
        parser.error(str(exc))
    host, port = server.server_address[:2]
    print(f"serving reward {args.reward!r} at http://{host}:{port} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
