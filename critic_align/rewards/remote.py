"""A reward computed by another process over HTTP (JSON in, floats out), with timeouts and retries.

For rewards that cannot live in the training process: a detector pipeline (GenEval-style object
detection), a VLM judge, a model in another environment or on another machine.  Only the standard
library is used on both sides (:mod:`http.client` here, :mod:`http.server` in the reference server
:mod:`critic_align.rewards.remote_server`).

Protocol (version 1)
--------------------
The client sends one ``POST`` to the reward's URL per batch (or per ``batch_size`` chunk) with
``Content-Type: application/json`` and the body::

    {"protocol": 1,
     "encoding": "png",                  # or "list"
     "shape": [B, C, H, W],              # of the samples, C = 1 (grayscale) or 3 (RGB)
     "prompts": ["a cat", ...],          # B strings
     "images": [...]}                    # B images, see below
    (+ "metadata": [{...} or null, ...]  # B, only when the run's prompt file is JSONL with metadata)

* ``"png"``: each image is a base64 string of an 8-bit PNG (mode ``L`` for ``C = 1``, ``RGB`` for
  ``C = 3``) of ``round(clamp((x + 1) / 2, 0, 1) * 255)``, i.e. the samples in ``[-1, 1]`` quantised as
  an image file would be.  Compact; what a server running an off-the-shelf image model wants.
* ``"list"``: each image is the raw sample as nested lists ``[C][H][W]`` of floats in (about)
  ``[-1, 1]``, unclamped and unquantised.  Exact; large (about 10 bytes per value).

A successful answer is status 200 with the JSON body ``{"scores": [s_1, ..., s_B]}``: one number per
sample, in order, higher is better; ``null`` means "not applicable to this sample" and becomes NaN,
which is accepted only by a client created with ``allows_nan=True``.  Other keys are ignored.  An
error is any other status, preferably with the body ``{"error": "what went wrong"}``; the client puts
that message in its error.

Client behaviour: each request has a ``timeout`` (seconds): a deadline for the whole request -- connecting,
sending and receiving every byte of the answer (a server that trickles its answer is cut off at the deadline).
Connection failures, timeouts, HTTP 5xx and 429 are retried up to ``retries`` times, sleeping
``backoff · 2^k`` seconds (at most ``max_backoff``) before retry ``k + 1``; other HTTP errors (4xx),
answers that are not JSON, and answers with a missing or wrong-length ``scores`` list fail at once
(retrying a deterministic failure only delays it).  Every failure is a
:class:`~critic_align.rewards.base.RewardError` that names the URL and what went wrong.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence

import numpy as np
import torch

from critic_align.rewards.base import Reward, RewardError

__all__ = ["ENCODINGS", "PROTOCOL_VERSION", "RemoteReward", "decode_images", "encode_images"]

PROTOCOL_VERSION = 1
ENCODINGS = ("png", "list")
_RETRY_STATUS = {429, 500, 502, 503, 504}


def _check_samples(samples) -> None:
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"expects a (B, C, H, W) tensor, got {type(samples).__name__}")
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(
            f"expects samples of shape (B, C, H, W) with C = 1 or 3 in [-1, 1], got {tuple(samples.shape)}"
        )
    if not samples.is_floating_point():
        raise TypeError(f"expects float samples in [-1, 1], got dtype {samples.dtype}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("got non-finite (NaN/inf) pixel values")


def encode_images(samples: torch.Tensor, encoding: str = "png") -> list:
    """Encode ``(B, C, H, W)`` samples in ``[-1, 1]`` for a request (see the module docstring)."""
    from PIL import Image

    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    _check_samples(samples)
    x = samples.detach().float().cpu()
    if encoding == "list":
        return x.tolist()
    pixels = ((x + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    out = []
    for img in pixels:
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_images(images: Sequence, encoding: str, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`encode_images`: a ``(B, C, H, W)`` float32 tensor in ``[-1, 1]``.

    PNG images come back as ``u8 / 255 · 2 − 1``.  Raises ``ValueError`` naming the offending image
    when the request is malformed (wrong count, size or mode, undecodable data).
    """
    from PIL import Image

    if encoding not in ENCODINGS:
        raise ValueError(f"'encoding' must be one of {list(ENCODINGS)}, got {encoding!r}")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 4 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"'shape' must be [B, C, H, W] of positive ints, got {shape!r}")
    b, c, h, w = shape
    if c not in (1, 3):
        raise ValueError(f"'shape' has C = {c}; only 1 (grayscale) and 3 (RGB) are supported")
    if not isinstance(images, list) or len(images) != b:
        n = len(images) if isinstance(images, list) else type(images).__name__
        raise ValueError(f"'images' must be a list of B = {b} images, got {n}")
    if encoding == "list":
        try:
            x = torch.tensor(images, dtype=torch.float32)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"'images' is not a nested list of numbers of shape {list(shape)} ({exc})") from exc
        if tuple(x.shape) != (b, c, h, w):
            raise ValueError(f"'images' has shape {list(x.shape)}, but 'shape' says {list(shape)}")
        return x
    mode = "L" if c == 1 else "RGB"
    out = []
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise ValueError(f"image {i}: expected a base64 PNG string, got {type(item).__name__}")
        try:
            img = Image.open(io.BytesIO(base64.b64decode(item, validate=True)))
            img.load()
        except Exception as exc:
            raise ValueError(f"image {i}: not a base64-encoded PNG ({exc})") from exc
        if img.mode != mode or img.size != (w, h):
            raise ValueError(f"image {i}: {img.mode} {img.size[1]}x{img.size[0]}, expected {mode} {h}x{w}")
        arr = np.asarray(img, dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).reshape(h, w, c).permute(2, 0, 1))
    return torch.stack(out).float().div(255).mul(2).sub(1)


class _Retryable(Exception):
    """A failure worth retrying (connection, timeout, 5xx/429); ``str`` is the message for the user."""


class RemoteReward(Reward):
    """A reward served over HTTP by another process (protocol in the module docstring).

    ``RemoteReward(url, *, encoding="png", timeout=60.0, retries=2, backoff=0.5, max_backoff=30.0,
    batch_size=None, allows_nan=False, headers=None, name="remote")``:

    * ``url`` -- ``http://`` or ``https://`` address the batches are POSTed to;
    * ``encoding`` -- ``"png"`` (8-bit PNG per image, base64) or ``"list"`` (raw floats);
    * ``timeout`` -- seconds one request may take in all (connect, send, the whole answer);
    * ``retries`` -- extra attempts after a connection failure, timeout, HTTP 5xx or 429, with sleeps of
      ``backoff · 2^k`` seconds capped at ``max_backoff``;
    * ``batch_size`` -- samples per request (``None``: the whole batch in one request);
    * ``allows_nan`` -- accept ``null`` scores as NaN ("not applicable", see :class:`MultiReward`);
    * ``headers`` -- extra HTTP headers (e.g. an ``Authorization`` token for your own server);
    * ``name`` -- the reward's name (give each remote reward in a :class:`MultiReward` its own).

    Not differentiable.  Nothing is contacted before the first call.
    """

    differentiable = False

    def __init__(
        self,
        url: str,
        *,
        encoding: str = "png",
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        batch_size: int | None = None,
        allows_nan: bool = False,
        headers: dict | None = None,
        name: str = "remote",
    ):
        if not isinstance(url, str):
            raise TypeError(f"RemoteReward url must be a string, got {type(url).__name__}")
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"RemoteReward url must be an http:// or https:// address with a host, got {url!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"RemoteReward encoding must be one of {ENCODINGS}, got {encoding!r}")
        timeout, backoff, max_backoff = float(timeout), float(backoff), float(max_backoff)
        if not (0 < timeout < math.inf):
            raise ValueError(f"RemoteReward timeout must be a positive number of seconds, got {timeout}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"RemoteReward retries must be an int >= 0, got {retries!r}")
        if not (0 <= backoff < math.inf) or not (0 <= max_backoff < math.inf):
            raise ValueError(f"RemoteReward backoff/max_backoff must be finite and >= 0, got {backoff}/{max_backoff}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"RemoteReward batch_size must be a positive int or None, got {batch_size!r}")
        if headers is not None and not (
            isinstance(headers, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        ):
            raise ValueError("RemoteReward headers must be a {str: str} mapping")
        if not isinstance(name, str) or not name:
            raise ValueError(f"RemoteReward name must be a non-empty string, got {name!r}")
        self.url = url
        self.encoding = encoding
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.batch_size = batch_size
        self.allows_nan = bool(allows_nan)
        self.headers = dict(headers or {})
        self.name = name

    def __repr__(self) -> str:
        return f"RemoteReward(name={self.name!r}, url={self.url!r}, encoding={self.encoding!r})"

    def compute(self, samples, prompts):
        _check_samples(samples)
        b = samples.shape[0]
        prompts = [""] * b if prompts is None else list(prompts)
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
        step = self.batch_size or max(b, 1)
        scores = []
        for i in range(0, b, step):
            scores.extend(self._score_chunk(samples[i : i + step], prompts[i : i + step]))
        return torch.tensor(scores, dtype=torch.float32, device=samples.device)

    # ------------------------------------------------------------------ one request

    def _score_chunk(self, samples: torch.Tensor, prompts: list[str]) -> list[float]:
        body = json.dumps(
            {
                "protocol": PROTOCOL_VERSION,
                "encoding": self.encoding,
                "shape": list(samples.shape),
                "prompts": prompts,
                "images": encode_images(samples, self.encoding),
            }
            | ({"metadata": self.metadata(prompts)} if self.prompt_metadata else {})
        ).encode("utf-8")
        attempts = self.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                raw = self._post(body)
                break
            except _Retryable as exc:
                if attempt == attempts:
                    raise RewardError(
                        f"remote reward {self.name!r} at {self.url}: {exc} (gave up after {attempts} attempt"
                        f"{'s' if attempts > 1 else ''})"
                    ) from exc.__cause__
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
        return self._parse(raw, samples.shape[0])

    def _post(self, body: bytes) -> bytes:
        """One request under a total deadline of ``timeout`` seconds (connect, send, every byte of the answer).

        A per-read timeout is not a deadline: a server trickling a byte every half second would hold a
        ``timeout: 1`` request forever.  A timer shuts the socket down when the deadline passes, which ends any
        blocking read at once.
        """
        parsed = urllib.parse.urlsplit(self.url)
        conn_cls = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parsed.hostname, parsed.port, timeout=self.timeout)
        path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        headers = {"Content-Type": "application/json", "Accept": "application/json", **self.headers}
        expired = threading.Event()
        held = []  # the connected socket: http.client drops conn.sock once a response will close the connection
        # (an HTTP/1.0 server, "Connection: close"), while the response still reads from it

        def abort():
            # the shutdown ends a blocked read at once, but Linux still hands a read the bytes that arrive after it
            # (a trickling server keeps a read loop alive): a 1 ms timeout makes the next read fail, and the body is
            # read chunk by chunk with the deadline checked between chunks (_read_before)
            expired.set()
            for sock in held or [conn.sock]:
                if sock is None:
                    continue
                try:
                    sock.settimeout(0.001)
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(self.timeout, abort)
        timer.daemon = True
        timer.start()
        timeout_msg = f"no answer within the timeout of {self.timeout:g} s"
        try:
            try:
                conn.connect()
                held.append(conn.sock)
                if expired.is_set():  # the deadline passed while connecting
                    abort()
            except (TimeoutError, socket.timeout) as exc:
                raise _Retryable(timeout_msg) from exc
            except OSError as exc:
                if expired.is_set():
                    raise _Retryable(timeout_msg) from exc
                raise _Retryable(
                    f"could not connect ({exc}); is the reward server running at this address? "
                    f"(the reference server: python -m critic_align.rewards.remote_server --port PORT --reward NAME)"
                ) from exc
            try:
                conn.request("POST", path, body=body, headers=headers)
                response = conn.getresponse()
                raw = _read_before(response, expired)
            except (OSError, http.client.HTTPException) as exc:
                if expired.is_set() or isinstance(exc, (TimeoutError, socket.timeout)):
                    raise _Retryable(timeout_msg) from exc
                raise _Retryable(f"the connection failed ({type(exc).__name__}: {exc})") from exc
            if expired.is_set():  # the answer may have been cut by the shutdown
                raise _Retryable(timeout_msg)
        finally:
            timer.cancel()
            conn.close()
        if response.status != 200:
            message = f"the server answered HTTP {response.status} {response.reason}{_error_detail(raw)}"
            if response.status in _RETRY_STATUS:
                raise _Retryable(message)
            raise RewardError(f"remote reward {self.name!r} at {self.url}: {message}")
        return raw

    def _parse(self, raw: bytes, batch_size: int) -> list[float]:
        where = f"remote reward {self.name!r} at {self.url}"
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RewardError(f"{where}: the answer is not valid JSON ({exc}); it starts with {raw[:200]!r}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("scores"), list):
            raise RewardError(
                f"{where}: the answer must be a JSON object with a 'scores' list, got {json.dumps(data)[:200]}"
            )
        scores = data["scores"]
        if len(scores) != batch_size:
            raise RewardError(f"{where}: the server returned {len(scores)} scores for {batch_size} samples")
        out = []
        for i, s in enumerate(scores):
            if s is None:
                out.append(math.nan)
            elif isinstance(s, (int, float)) and not isinstance(s, bool):
                out.append(float(s))
            else:
                raise RewardError(f"{where}: score {i} is {s!r}; scores must be numbers (or null for 'not applicable')")
        return out


def _read_before(response, expired: threading.Event) -> bytes:
    """The whole body of ``response``, one system call at a time, stopping with a timeout once ``expired`` is set
    (a body cut short by the server is a failed connection, not a short answer)."""
    parts = []
    while True:
        if expired.is_set():
            raise TimeoutError("the deadline passed while the answer was arriving")
        chunk = response.read1(1 << 16)
        if not chunk:
            break
        parts.append(chunk)
    if response.length:  # Content-Length announced more than arrived
        raise http.client.IncompleteRead(b"".join(parts), response.length)
    return b"".join(parts)


def _error_detail(body: bytes) -> str:
    """The server's ``{"error": ...}`` message (or the start of its body) for an error status."""
    if not body:
        return ""
    try:
        data = json.loads(body.decode("utf-8"))
        if isinstance(data, dict) and "error" in data:
            return f": {data['error']}"
    except (UnicodeDecodeError, json.JSONDecodeError):
        pass
    return f": {body[:200]!r}"
