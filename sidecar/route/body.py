"""The request body stage: what the downstream sent that no upstream stream has taken yet, and
what is kept to send again on a retry.

In: the downstream request's DATA and trailers, while the try is still waiting for its stream
and for as long as a retry may need them again (up to ``REPLAY_LIMIT`` bytes). Out: the same
bytes and trailers, in order, written into a try's upstream stream, each chunk's flow-control
credit given to the downstream only once the upstream has taken it. Made at the request's
first DATA frame or trailers: a request that its headers end never makes one.
"""

from __future__ import annotations

from collections import deque

from sidecar.http.streams import Headers, OnSent, StreamSink

REPLAY_LIMIT = 64 * 1024
"""Body bytes kept for a retry; past them, the request is not retried once it has started."""


class RequestBody:
    """The body of one downstream request, as the exchange relays it."""

    __slots__ = ("downstream", "pending", "replay", "replay_size", "trailers")

    def __init__(self, downstream: StreamSink) -> None:
        self.downstream = downstream
        self.pending: deque[tuple[bytes, bool, int]] = deque()  # not yet taken upstream
        self.replay: list[bytes] | None = []  # None: too much to replay
        self.replay_size = 0
        self.trailers: Headers | None = None

    @property
    def empty(self) -> bool:
        """Nothing to write after a try's headers (the request ended with an empty frame)."""
        return not self.pending and not self.replay_size and self.trailers is None

    def keep(self, data: bytes) -> None:
        """Keep ``data`` for a retry, while the body is small enough to replay."""
        if self.replay is not None and data:
            self.replay_size += len(data)
            if self.replay_size > REPLAY_LIMIT:
                self.replay = None
            else:
                self.replay.append(data)

    def credit(self, flow_len: int) -> OnSent:
        """What gives the downstream its ``flow_len`` back, once the upstream took the bytes."""
        if not flow_len:
            return None
        downstream = self.downstream
        return lambda: downstream.ack(flow_len)

    def write_to(self, stream: StreamSink, *, resend: bool, request_ended: bool) -> None:
        """Everything a try's new stream must get after its headers: for a retry (``resend``),
        the bytes an earlier try took first; then what is pending, and the request's end."""
        pending = self.pending
        replay = self.replay
        if resend and replay:
            # Bytes an earlier try took (and the downstream was credited for) go again.
            unsent = sum(1 for data, _, _ in pending if data)
            for chunk in replay[: len(replay) - unsent]:
                stream.send_data(chunk, False, None)
        ended = False
        while pending:
            data, end, flow_len = pending.popleft()
            stream.send_data(data, end, self.credit(flow_len))
            ended = end
        if self.trailers is not None:
            stream.send_trailers(self.trailers)
        elif request_ended and not ended:
            stream.send_data(b"", True, None)

    def release(self) -> None:
        """The request is over: credit the downstream for the bytes no upstream took (it was
        not credited for them yet), and drop what was kept for a retry."""
        pending = self.pending
        while pending:
            flow_len = pending.popleft()[2]
            if flow_len:
                self.downstream.ack(flow_len)
        self.replay = None
