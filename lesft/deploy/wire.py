"""gRPC plumbing shared by the split server and its clients: no protobuf, no pickle.

A message (``messages.encode``: JSON header + raw tensor buffers) travels as a stream of byte chunks of
at most ``chunk_mb`` each, so a message of any size passes gRPC's per-message limits; a message larger
than ``max_message_mb`` is refused with a clear error. Calls carry the client's token as
``authorization: Bearer <token>`` metadata. TLS is on for every non-loopback address unless the party
was started with ``--insecure``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import random
import secrets
import stat
import sys
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import grpc

from lesft.messages import Message, WireFormat, decode, encode_parts, message_size, payload_size

SERVICE = "lesft.SplitServer"
HELLO = f"/{SERVICE}/Hello"        # unary: JSON hello -> JSON state
EXCHANGE = f"/{SERVICE}/Exchange"  # stream of chunks (one message) -> stream of chunks (the reply)
EXCHANGE_ONE = f"/{SERVICE}/ExchangeOne"  # a message that fits one chunk -> stream of chunks (less overhead)
from lesft.units import MB  # noqa: F401  (re-exported)


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class NetArgs:
    """Network settings shared by ``lesft server`` and ``lesft client``."""

    chunk_mb: float = _help("Bytes per gRPC stream chunk, in MiB (messages of any size are cut into chunks).",
                            default=1.0)
    max_message_mb: float = _help("Largest message accepted or sent, in MiB; larger ones are refused.",
                                  default=2048.0)
    timeout_s: float = _help("Server: how long a step waits for missing clients after the first one arrived "
                             "(they are left out of that step). Client: deadline of one call.", default=120.0)
    adaptive_deadline: float = _help(
        "Server: also end a step's wait at this multiple of the median arrival delay (after the step's first "
        "message) of the clients that have arrived, once half of those expected have, but never before 1 s and "
        "never after --timeout_s (0 = off: wait --timeout_s).", default=0.0)
    retries: int = _help("Client: attempts per call when the server is unreachable (exponential backoff).",
                         default=8)
    backoff_s: float = _help("Client: first retry delay in seconds (doubles per attempt, capped at 30 s).",
                             default=0.5)
    tls_cert: str | None = _help("Server: PEM certificate chain. Client: its own certificate, for a server that "
                                 "requires client certificates (mTLS; with --tls_key).", default=None)
    tls_key: str | None = _help("PEM private key of --tls_cert (server's, or a client's for mTLS).", default=None)
    tls_ca: str | None = _help("Client: PEM CA certificate that signed the server's. Server: with it, require "
                               "client certificates signed by this CA (mTLS).", default=None)
    recv_timeout_s: float = _help("Server: longest time one incoming message may take to arrive in full "
                                  "(DEADLINE_EXCEEDED after it).", default=120.0)
    max_streams: int = _help("Server: calls one client may have open at once (RESOURCE_EXHAUSTED beyond).",
                             default=2)
    max_inflight_mb: float = _help("Server: MiB one client's open calls may hold while receiving "
                                   "(RESOURCE_EXHAUSTED beyond).", default=2048.0)
    insecure: bool = _help("Allow plaintext on a non-loopback address (never do this across a real network).",
                           default=False)

    def grpc_options(self) -> list[tuple[str, int]]:
        limit = int(self.chunk_mb * MB) + 64 * 1024
        return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                # larger socket reads: ~20% more throughput for MB-sized messages on loopback
                ("grpc.experimental.tcp_read_chunk_size", 4 * MB),
                ("grpc.experimental.tcp_max_read_chunk_size", 8 * MB),
                ("grpc.http2.lookahead_bytes", 8 * MB)]


class MessageTooLarge(ValueError):
    """A message exceeds ``--max_message_mb``."""


def chunks(parts: bytes | bytearray | list, chunk_mb: float) -> Iterator[bytes]:
    """The concatenation of ``parts`` (one buffer or a list, e.g. ``encode_parts``) as consecutive chunks of
    ``chunk_mb`` MiB (the last one shorter; one empty chunk for no data). Each byte is copied once."""
    size = max(1, int(chunk_mb * MB))
    pending: list[memoryview] = []
    filled, sent = 0, False
    for p in ([parts] if isinstance(parts, (bytes, bytearray, memoryview)) else parts):
        view = memoryview(p).cast("B")
        while len(view):
            take = min(size - filled, len(view))
            pending.append(view[:take])
            filled += take
            view = view[take:]
            if filled == size:
                yield b"".join(pending)
                pending, filled, sent = [], 0, True
    if pending or not sent:
        yield b"".join(pending)


def join(parts: Iterable[bytes], max_message_mb: float, take: Callable[[int], None] | None = None) -> bytearray:
    """Assemble a chunk stream into one buffer that grows as bytes arrive (never allocated from the size
    the header announces), refusing a message over ``max_message_mb`` as soon as its header says so.
    ``take(n)`` is called before ``n`` more bytes are kept (the server's per-client byte budget)."""
    limit = int(max_message_mb * MB)
    out = bytearray()
    total: int | None = None
    for p in parts:
        if take is not None:
            take(len(p))
        out += p
        if total is None:
            total = message_size(out)
            if total is not None and total > limit:
                raise MessageTooLarge(_too_large(max_message_mb, total))
        if len(out) > (limit if total is None else total):
            if total is None:
                raise MessageTooLarge(_too_large(max_message_mb))
            raise ValueError(f"message longer than its header announces ({total} bytes)")
    if total is None or len(out) != total:
        raise ValueError(f"message truncated: got {len(out)} bytes" + (f" of {total}" if total is not None else ""))
    return out


def _too_large(limit_mb: float, size: int | None = None) -> str:
    what = f"a message of {size / MB:.1f} MiB" if size is not None else "a message"
    return (f"{what} exceeds the {limit_mb:g} MiB limit (--max_message_mb); send smaller micro-batches or "
            "raise the limit on both sides")


def is_loopback(address: str) -> bool:
    """True for ``localhost``/``127.x``/``::1`` addresses (``HOST:PORT``, IPv6 in brackets)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"TLS file not found: {p}")
    return p.read_bytes()


def server_credentials(address: str, net: NetArgs) -> grpc.ServerCredentials | None:
    """TLS credentials for ``address``, or None for plaintext (loopback, or ``--insecure``)."""
    if net.tls_cert or net.tls_key:
        if not (net.tls_cert and net.tls_key):
            raise ValueError("TLS needs both --tls_cert and --tls_key")
        ca = _read(net.tls_ca)
        return grpc.ssl_server_credentials([(_read(net.tls_key), _read(net.tls_cert))], root_certificates=ca,
                                           require_client_auth=ca is not None)
    if not is_loopback(address) and not net.insecure:
        raise ValueError(f"refusing to serve {address} without TLS: give --tls_cert and --tls_key, or --insecure "
                         "to accept plaintext (only on a network you trust)")
    return None


def start_server(handlers: Iterable[grpc.GenericRpcHandler], address: str, net: NetArgs, workers: int
                 ) -> tuple[grpc.Server, int]:
    """A gRPC server with ``handlers`` and ``workers`` threads, listening on ``address`` (TLS unless plaintext
    is allowed there) and started; returns (server, port)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=net.grpc_options())
    server.add_generic_rpc_handlers(tuple(handlers))
    creds = server_credentials(address, net)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not listen on {address}")
    server.start()
    return server, port


def call_with_retries(fn: Callable[[], object], net: NetArgs,
                      retryable: set[grpc.StatusCode] | Callable[[grpc.RpcError], bool]):
    """``fn()``, retried ``net.retries`` times on the ``retryable`` status codes (or errors, given a predicate)
    with exponential backoff (``net.backoff_s``, doubling, at most 30 s) and jitter (each wait drawn from
    [0.5, 1.5] x the backoff, so that many clients do not retry a restarting server in lockstep); any other
    error, or the last one, is raised."""
    retry = retryable if callable(retryable) else (lambda e: e.code() in retryable)
    delay = net.backoff_s
    for attempt in range(net.retries + 1):
        try:
            return fn()
        except grpc.RpcError as e:
            if not retry(e) or attempt == net.retries:
                raise
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 30.0)


def channel(address: str, net: NetArgs) -> grpc.Channel:
    """A channel to the split server: TLS when a CA is given, plaintext only on loopback or ``--insecure``."""
    if net.tls_cert or net.tls_key:  # this client's own certificate, for a server that requires one (mTLS)
        if not (net.tls_cert and net.tls_key and net.tls_ca):
            raise ValueError("a client certificate needs --tls_cert, --tls_key and --tls_ca (the server's CA)")
    if net.tls_ca:
        creds = grpc.ssl_channel_credentials(root_certificates=_read(net.tls_ca), private_key=_read(net.tls_key),
                                             certificate_chain=_read(net.tls_cert))
        return grpc.secure_channel(address, creds, options=net.grpc_options())
    if not is_loopback(address) and not net.insecure:
        raise ValueError(f"refusing to connect to {address} without TLS: give --tls_ca (the CA of the server's "
                         "certificate), or --insecure to send plaintext (only on a network you trust)")
    return grpc.insecure_channel(address, options=net.grpc_options())


MIN_TOKEN_CHARS = 22  # 16 random bytes in URL-safe base64 (``secrets.token_urlsafe(16)``)


def check_tokens(tokens: dict[str, int], where: str = "tokens") -> None:
    """Refuse empty, short (< ``MIN_TOKEN_CHARS``) or non-printable-ASCII tokens."""
    for tok, cid in tokens.items():
        if len(tok) < MIN_TOKEN_CHARS or not tok.isascii() or not tok.isprintable() or " " in tok:
            raise ValueError(f"{where}: the token of client {cid} is empty, shorter than {MIN_TOKEN_CHARS} "
                             "characters or not printable ASCII; use secrets.token_urlsafe(24) or delete the "
                             "file and pass --clients N to create one")


def load_tokens(path: str | Path, clients: int | None = None) -> dict[str, int]:
    """``{token: client id}`` from a JSON file ``{"0": "token", ...}``; with ``clients`` and no file yet,
    create one with a random token per client first (created 0600, written in full, then renamed into
    place). A file that group or others may read is refused; so are short or shared tokens."""
    p = Path(path)
    if not p.is_file():
        if not clients:
            raise FileNotFoundError(f"token file {p} not found (pass --clients N to create one)")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({str(i): secrets.token_urlsafe(24) for i in range(clients)}, indent=2))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077 and sys.platform != "win32":
        raise ValueError(f"token file {p} has mode {mode:04o}: others may read the secrets in it; "
                         f"run `chmod 600 {p}`")
    try:
        data = json.loads(p.read_text())
        tokens = {str(tok): int(cid) for cid, tok in data.items()}
    except (ValueError, AttributeError) as e:
        raise ValueError(f"token file {p} must be a JSON object {{client id: token}}: {e}") from e
    if len(tokens) != len(data):
        raise ValueError(f"token file {p}: two clients share a token")
    check_tokens(tokens, f"token file {p}")
    return tokens


def bearer(metadata: Iterable[tuple[str, str]] | None, tokens: dict[str, int]) -> int | None:
    """The client id whose token is in ``authorization: Bearer <token>`` metadata (compared in constant
    time), or None."""
    auth = dict(metadata or ()).get("authorization", "")
    if not isinstance(auth, str) or not auth.startswith("Bearer "):
        return None
    given = auth[len("Bearer "):].encode()
    found = None
    for tok, cid in tokens.items():
        if hmac.compare_digest(tok.encode(), given):
            found = cid
    return found


def client_token(client_id: int, token: str | None = None, token_file: str | None = None) -> str:
    """This client's token: given directly, or looked up by id in a ``{client id: token}`` JSON file."""
    if token is None and token_file:
        token = json.loads(Path(token_file).read_text()).get(str(client_id))
    if not token:
        raise ValueError(f"client {client_id}: give --token or a --token-file that holds its token")
    return str(token)


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class RemoteError(ConnectionError):
    """A lesft server refused a call (the message names the server, the call and why)."""


def send_message(msg: Message, wire: WireFormat | str, net: NetArgs, unary: Callable, stream: Callable,
                 md: tuple[tuple[str, str], ...], timeout: float, call: Callable[[Callable[[], bytearray]], Any],
                 meter: Any) -> Message:
    """A client's send-and-receive of one message, for every lesft service: as one request when it fits a
    chunk (``unary``, about 0.5 ms less per call), else as a chunked stream (``stream``); the chunked reply is
    joined and decoded. ``call(fn)`` runs ``fn`` with the caller's retries and error mapping; both directions
    are counted in ``meter`` by message kind."""
    parts, payload = encode_parts(msg, wire)
    size = len(parts[0]) + payload
    one = size <= net.chunk_mb * MB

    def once() -> bytearray:
        replies = (unary(b"".join(parts), metadata=md, timeout=timeout) if one
                   else stream(chunks(parts, net.chunk_mb), metadata=md, timeout=timeout))
        return join(replies, net.max_message_mb)

    reply = call(once)
    meter.add("client_to_server", msg.kind, payload, size)
    out = decode(reply)
    meter.add("server_to_client", out.kind, payload_size(reply), len(reply))
    return out
