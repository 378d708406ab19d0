"""The split service's gRPC endpoint: ``serve`` authenticates each caller by its bearer token, keeps it within
its caps (``Admission``), gives every message a receive deadline, sends replies in chunks, and answers every
refusal with a status code and a one-line reason (the details of an internal error go to the log only)."""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Callable, Iterator

import grpc

from lesft.deploy.admission import Admission
from lesft.deploy.checks import ServiceError
from lesft.deploy.service import Parts, SplitService
from lesft.deploy.wire import (EXCHANGE, EXCHANGE_ONE, HELLO, MB, MessageTooLarge, NetArgs, bearer, check_tokens,
                               chunks, join, start_server)


def _expire(context: grpc.ServicerContext, reason: str) -> None:
    """End a call with DEADLINE_EXCEEDED (from a timer thread). grpcio's public ``cancel()`` can only
    say CANCELLED; the call object under it takes a status and a reason."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(grpc.StatusCode.DEADLINE_EXCEEDED.value[0], reason)
    except Exception:  # noqa: BLE001 -- another grpcio: cancel without a status
        context.cancel()


@contextlib.contextmanager
def _deadline(context: grpc.ServicerContext, seconds: float, reason: str) -> Iterator[threading.Event]:
    """End the call with DEADLINE_EXCEEDED ``reason`` if the block is still running after ``seconds``;
    yields the event that tells whether it did."""
    fired = threading.Event()
    timer = threading.Timer(seconds, lambda: (fired.set(), _expire(context, reason)))
    timer.daemon = True
    timer.start()
    try:
        yield fired
    finally:
        timer.cancel()


def serve(service: SplitService, address: str, net: NetArgs, tokens: dict[str, int],
          workers: int | None = None, handlers: tuple = ()) -> tuple[grpc.Server, int]:
    """Start the gRPC server on ``address`` (``HOST:PORT``, port 0 = any free one); returns (server, port).
    ``handlers``: more services on the same port (``lesft.deploy.generation.generation_handler``)."""
    check_tokens(tokens)
    admission = service.admission = Admission(net.max_streams, int(net.max_inflight_mb * MB))  # (tests read it)

    def call(context: grpc.ServicerContext, fn: Callable[[int, Callable[[int], None]], Any]) -> Any:
        """``fn(client id, take)`` for an authenticated caller within its caps; every refusal is answered
        with a status code and a one-line reason, and logged."""
        cid = bearer(context.invocation_metadata(), tokens)
        try:
            if cid is None:
                raise ServiceError(grpc.StatusCode.UNAUTHENTICATED,
                                   "unknown or missing client token (expected authorization: Bearer <token>)")
            with admission.enter(cid) as take:
                return fn(cid, take)
        except ServiceError as e:
            err = e
        except MessageTooLarge as e:
            err = ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except ValueError as e:  # join's own words: truncated or overlong messages
            err = ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except grpc.RpcError:  # the call ended while receiving (its deadline, or the peer went away)
            err = ServiceError(grpc.StatusCode.CANCELLED, f"client {cid}: the call ended before its message did")
        except Exception as e:  # noqa: BLE001 -- the details go to the log, never to the peer
            service.refused(cid, ServiceError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))
            context.abort(grpc.StatusCode.INTERNAL, f"internal error ({type(e).__name__}; see the server log)")
        service.refused(cid, err)
        err.__traceback__ = None  # its frames hold the refused message's buffers
        if cid is not None:
            admission.trim_after_failure(cid)
        context.abort(err.code, str(err))

    def receive(chunks_in, context: grpc.ServicerContext, take: Callable[[int], None]) -> bytearray:
        """A message within ``--recv_timeout_s`` (else the call ends with DEADLINE_EXCEEDED)."""
        reason = f"message not received in full within {net.recv_timeout_s:g} s (--recv_timeout_s)"
        with _deadline(context, net.recv_timeout_s, reason) as fired:
            try:
                return join(chunks_in, net.max_message_mb, take)
            except (grpc.RpcError, ValueError):
                if fired.is_set():
                    raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, reason) from None
                raise

    def send(reply: Parts, context: grpc.ServicerContext) -> Iterator[bytes]:
        """The reply's chunks; a peer that does not take them within ``--recv_timeout_s`` loses the call."""
        if sum(memoryview(p).nbytes for p in reply) <= net.chunk_mb * MB:  # one chunk: gRPC buffers it
            yield from chunks(reply, net.chunk_mb)
            return
        with _deadline(context, net.recv_timeout_s, f"reply not taken within {net.recv_timeout_s:g} s"):
            yield from chunks(reply, net.chunk_mb)

    def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        def fn(cid: int, take) -> bytes:
            try:
                info = json.loads(request or b"{}")
            except (ValueError, UnicodeDecodeError):
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "hello is not JSON") from None
            return json.dumps(service.hello(cid, info)).encode()
        return call(context, fn)

    def exchange(request_iterator, context: grpc.ServicerContext):
        reply = call(context, lambda cid, take: service.exchange(cid, receive(request_iterator, context, take)))
        yield from send(reply, context)

    def exchange_one(request: bytes, context: grpc.ServicerContext):
        reply = call(context, lambda cid, take: service.exchange(cid, join([request], net.max_message_mb, take)))
        yield from send(reply, context)

    handler = grpc.method_handlers_generic_handler("lesft.SplitServer", {
        "Hello": grpc.unary_unary_rpc_method_handler(hello),
        "Exchange": grpc.stream_stream_rpc_method_handler(exchange),
        "ExchangeOne": grpc.unary_stream_rpc_method_handler(exchange_one),
    })
    assert HELLO.endswith("/Hello") and EXCHANGE.endswith("/Exchange") and EXCHANGE_ONE.endswith("/ExchangeOne")
    # every client may hold max_streams workers; 4 more for callers that are refused at once
    pool = workers or net.max_streams * max(len(service.known), 1) + 4
    return start_server((handler, *handlers), address, net, pool)
