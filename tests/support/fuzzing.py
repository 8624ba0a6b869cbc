"""A seeded fuzzer for every RPC of JobService and WorkerService.

It sends three kinds of input, all built from the services' descriptors so that new fields are fuzzed
without changes here: random messages (every field filled with edge values: empty, huge, negative,
unicode, deep Structs, broken Anys), valid messages whose serialized bytes are then mutated, and raw
random bytes. Calls go through a generic channel with bytes in and bytes out, so the fuzzer can send
what no generated stub would. ``Fuzzer.run`` returns the count of each status code seen; the callers
(the test and ``bench/fuzz.py``) decide what is acceptable.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import any_pb2, message_factory, struct_pb2
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from jobwire.v1 import job_service_pb2, worker_service_pb2

SERVICES = (
    job_service_pb2.DESCRIPTOR.services_by_name["JobService"],
    worker_service_pb2.DESCRIPTOR.services_by_name["WorkerService"],
)
KNOWN_TYPES = ("demo.echo", "test.echo", "demo.sleep", "fuzz.type", "test.gate")
T = FieldDescriptor
CLIENT_WRITE_AFTER_END = "CLIENT_WRITE_AFTER_END"
CLIENT_REFUSED_TRAILERS = "CLIENT_REFUSED_TRAILERS"
# What no call may get: UNKNOWN or INTERNAL, or an error whose trailers the client refuses.
DEFECTS = ("UNKNOWN", "INTERNAL", CLIENT_REFUSED_TRAILERS)
CLIENT_SEND_FAILED = "CLIENT_SEND_FAILED"


def _client_write_after_end(error: grpc.aio.AioRpcError) -> bool:
    return error.code() == grpc.StatusCode.INTERNAL and "SendMessageOperation" in (
        error.debug_error_string() or ""
    )


class Fuzzer:
    """Builds and sends fuzzed calls; ``seed`` makes a run repeatable."""

    def __init__(
        self,
        target: str,
        seed: int,
        *,
        max_string: int = 4096,
        rare_huge: bool = True,
        tokens: list[str] | None = None,
    ) -> None:
        self.target = target
        # With ``tokens`` (a server with authentication on): most calls carry one of them, the others no
        # credentials or broken ones.
        self.tokens = tokens or []
        self.rng = random.Random(seed)
        self.max_string = max_string
        self.rare_huge = rare_huge
        self.job_ids: list[str] = []
        self.codes: Counter[str] = Counter()
        # The first answer of each kind a test may need to look at (status, details, what grpc says).
        self.samples: dict[str, str] = {}
        self.by_method: dict[str, Counter[str]] = {}
        self.methods: list[tuple[str, MethodDescriptor]] = [
            (f"/{service.full_name}/{method.name}", method)
            for service in SERVICES
            for method in service.methods
        ]

    def defects(self) -> dict[str, dict[str, int]]:
        """Per method, the calls answered with a defect (empty: none)."""
        return {
            path: {code: counts[code] for code in DEFECTS if counts[code]}
            for path, counts in self.by_method.items()
            if any(counts[code] for code in DEFECTS)
        }

    # -- values ----------------------------------------------------------------------------------------

    def string(self, field: str = "") -> str:
        rng = self.rng
        roll = rng.random()
        if field in ("job_id",) and self.job_ids and roll < 0.5:
            return rng.choice(self.job_ids)
        if field == "type" and roll < 0.6:
            return rng.choice(KNOWN_TYPES)
        if field == "page_token" and roll < 0.5:
            return self.page_token()
        if roll < 0.1:
            return ""
        if roll < 0.2:
            return rng.choice(["a", "x" * 63, "Label-Key", "k.v", "../../etc", "\x00", "é漢字🙂", " "])
        if roll < 0.25 and self.rare_huge:
            return "y" * rng.choice([129, 1025, 4097, 70_000])
        length = rng.randrange(1, 40) if roll < 0.9 else rng.randrange(1, self.max_string)
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789._-:/ ABCé漢\n\t\"'[{"
        return "".join(rng.choice(alphabet) for _ in range(length))

    def page_token(self) -> str:
        """Tokens shaped like the server's (base64 of JSON), with hostile contents."""
        rng = self.rng
        payload = rng.choice(
            [
                "[" * rng.choice([100, 5000]),
                '{"after": 1, "filter": []}',
                '{"after": "' + "z" * 26 + '", "filter": "0000000000000000"}',
                "{" * 3000,
                '"just a string"',
            ]
        )
        return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")

    def integer(self, kind: int) -> int:
        rng = self.rng
        edges32 = [0, 1, -1, 5, 9, 10, 100, 1000, 10_001, 2**31 - 1, -(2**31)]
        edges64 = [*edges32, 2**63 - 1, -(2**63), 10**12]
        unsigned = kind in (T.TYPE_UINT32, T.TYPE_UINT64, T.TYPE_FIXED32, T.TYPE_FIXED64)
        wide = kind in (T.TYPE_INT64, T.TYPE_SINT64, T.TYPE_SFIXED64, T.TYPE_UINT64, T.TYPE_FIXED64)
        value = rng.choice(edges64 if wide else edges32) if rng.random() < 0.7 else rng.randrange(-50, 50)
        if unsigned:
            value = abs(value) % (2**64 if wide else 2**32)
        return value

    def json_value(self, depth: int) -> Any:
        rng = self.rng
        roll = rng.random()
        if depth <= 0 or roll < 0.4:
            return rng.choice([None, True, False, 0, -1.5, 1e308, 42, self.string(), "x" * 100])
        if roll < 0.7:
            return {self.string(): self.json_value(depth - 1) for _ in range(rng.randrange(0, 5))}
        return [self.json_value(depth - 1) for _ in range(rng.randrange(0, 5))]

    def struct(self, target: struct_pb2.Struct) -> None:
        rng = self.rng
        if rng.random() < 0.1:  # deep nesting, past the protobuf recursion limit now and then
            value: Any = "bottom"
            for _ in range(rng.choice([10, 60, 120])):
                value = {"n": value}
            target.update({"deep": value})
            return
        target.update({self.string(): self.json_value(3) for _ in range(rng.randrange(0, 6))})

    def any_detail(self, target: any_pb2.Any) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.4:
            info = error_details_pb2.ErrorInfo(reason=self.string(), domain=self.string())
            info.metadata.update({self.string(): self.string() for _ in range(rng.randrange(0, 4))})
            target.Pack(info)
        elif roll < 0.7:  # the right type name with bytes that do not decode
            target.type_url = "type.googleapis.com/google.rpc.ErrorInfo"
            target.value = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        else:
            target.type_url = self.string()
            target.value = rng.randbytes(rng.randrange(0, 32))

    def fill(self, message: Message, depth: int = 3) -> None:
        """Set a random subset of ``message``'s fields to random values."""
        rng = self.rng
        descriptor = message.DESCRIPTOR
        if descriptor.full_name == "google.protobuf.Struct":
            self.struct(message)  # type: ignore[arg-type]
            return
        if descriptor.full_name == "google.protobuf.Any":
            self.any_detail(message)  # type: ignore[arg-type]
            return
        # One member of each oneof, chosen uniformly (field order would favour the first one).
        chosen = {oneof.name: rng.choice(oneof.fields) for oneof in descriptor.oneofs}
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None:
                if chosen[oneof.name] is not field:
                    continue
            elif rng.random() < 0.35:
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                self._fill_map(message, field)
            elif field.is_repeated:
                count = rng.choice([0, 1, 2, 3, 5, 30]) if rng.random() < 0.97 else 1000
                for _ in range(count):
                    self._add_repeated(message, field, depth)
            elif field.type == T.TYPE_MESSAGE:
                if depth > 0:
                    self.fill(getattr(message, field.name), depth - 1)
                    if not getattr(message, field.name).ListFields():
                        getattr(message, field.name).SetInParent()
            else:
                setattr(message, field.name, self.scalar(field))

    def scalar(self, field: Any) -> Any:
        kind = field.type
        if kind == T.TYPE_STRING:
            return self.string(field.name)
        if kind == T.TYPE_BYTES:
            return self.rng.randbytes(self.rng.randrange(0, 64))
        if kind == T.TYPE_BOOL:
            return self.rng.random() < 0.5
        if kind in (T.TYPE_DOUBLE, T.TYPE_FLOAT):
            return self.rng.choice([0.0, -1.0, 0.5, 100.0, 1e300, float("inf"), float("nan"), -1e-9])
        if kind == T.TYPE_ENUM:
            assert field.enum_type is not None
            numbers = [v.number for v in field.enum_type.values]
            return self.rng.choice([*numbers, 99, -1])
        return self.integer(kind)

    def _add_repeated(self, message: Message, field: Any, depth: int) -> None:
        container = getattr(message, field.name)
        if field.type == T.TYPE_MESSAGE:
            if depth > 0:
                self.fill(container.add(), depth - 1)
            else:
                container.add()
        else:
            container.append(self.scalar(field))

    def _fill_map(self, message: Message, field: Any) -> None:
        container = getattr(message, field.name)
        assert field.message_type is not None
        value_field = field.message_type.fields_by_name["value"]
        count = self.rng.choice([0, 1, 3, 70]) if self.rng.random() < 0.97 else 600
        for _ in range(count):
            key = self.string("key")
            if value_field.type == T.TYPE_MESSAGE:
                self.fill(container[key], 1)
            else:
                container[key] = self.scalar(value_field)

    def request_bytes(self, method: MethodDescriptor) -> bytes:
        """One request: a random message, a mutated one, or random bytes."""
        rng = self.rng
        request = message_factory.GetMessageClass(method.input_type)()
        self.fill(request)
        raw = request.SerializeToString()
        roll = rng.random()
        if roll < 0.6:
            return raw
        if roll < 0.9 and raw:
            data = bytearray(raw)
            for _ in range(rng.randrange(1, 6)):
                op = rng.random()
                position = rng.randrange(len(data)) if data else 0
                if op < 0.5 and data:
                    data[position] = rng.randrange(256)
                elif op < 0.8:
                    data[position:position] = rng.randbytes(rng.randrange(1, 8))
                elif data:
                    del data[position : position + rng.randrange(1, 8)]
            return bytes(data)
        return rng.randbytes(rng.randrange(0, 200))

    # -- calls -----------------------------------------------------------------------------------------

    def _sample(self, kind: str, path: str, error: grpc.aio.AioRpcError) -> None:
        self.samples.setdefault(
            kind, f"{path}: {error.details()!r} ({(error.debug_error_string() or '')[:300]})"
        )

    def _record(self, path: str, code: grpc.StatusCode | str) -> None:
        name = code if isinstance(code, str) else code.name
        self.codes[name] += 1
        self.by_method.setdefault(path, Counter())[name] += 1

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Credentials for one call: usually a valid token (when there are tokens), else none or junk."""
        if not self.tokens:
            return None
        rng = self.rng
        roll = rng.random()

        def printable() -> str:  # what metadata may carry (the client refuses to send anything else)
            return "".join(ch for ch in self.string() if 32 <= ord(ch) < 127)

        if roll < 0.8:
            return (("authorization", f"Bearer {rng.choice(self.tokens)}"),)
        if roll < 0.85:
            return None
        junk = rng.choice(
            [
                "",
                "Bearer",
                "Bearer ",
                "Basic dXNlcjpwYXNz",
                f"Bearer {printable()}",
                f"bearer {rng.choice(self.tokens)[:-3]}abc",
                "Bearer " + "e" * rng.choice([10, 9000]),
                f"Bearer {'.'.join(printable()[:40] for _ in range(3))}",
            ]
        )
        return (("authorization", junk),)

    async def _seed_jobs(self, channel: grpc.aio.Channel) -> None:
        """A few real jobs, so that fuzzed ids and streams reach the code behind a successful lookup."""
        submit = channel.unary_unary("/jobwire.v1.JobService/SubmitJob")
        metadata = (("authorization", f"Bearer {self.tokens[0]}"),) if self.tokens else None
        for job_type in ("test.echo", "demo.sleep", "test.gate"):
            request = job_service_pb2.SubmitJobRequest(type=job_type)
            request.params.update({"seconds": 0.2})
            raw = await submit(request.SerializeToString(), timeout=5, metadata=metadata)
            self.job_ids.append(job_service_pb2.SubmitJobResponse.FromString(raw).job.id)

    async def call(self, channel: grpc.aio.Channel, path: str, method: MethodDescriptor) -> None:
        try:
            if method.client_streaming:
                await self._stream_call(channel, path, method)
            elif method.server_streaming:
                call = channel.unary_stream(path)(
                    self.request_bytes(method), timeout=0.5, metadata=self.metadata()
                )
                async for _ in call:
                    pass
            else:
                raw = await channel.unary_unary(path)(
                    self.request_bytes(method), timeout=5, metadata=self.metadata()
                )
                if path.endswith("SubmitJob"):
                    job_id = job_service_pb2.SubmitJobResponse.FromString(raw).job.id
                    if job_id:
                        self.job_ids.append(job_id)
            self._record(path, grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as error:
            if error.details() == CLIENT_SEND_FAILED:
                self._record(path, CLIENT_SEND_FAILED)
                return
            if _client_write_after_end(error):
                # The client was still sending on a stream the server had already ended (e.g. with
                # INVALID_ARGUMENT): grpcio reports its own failed send as INTERNAL. Not the server's.
                self._record(path, CLIENT_WRITE_AFTER_END)
                return
            details = error.details() or ""
            if (
                error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                and "metadata" in details
                and ":path" not in details
            ):
                # The client refused the answer's trailers as too large: the server's error was unbounded.
                # (With ":path" listed it is the server refusing a request's headers past its 64 KiB limit,
                # as it should: the fuzzer sends such tokens.)
                self._sample(CLIENT_REFUSED_TRAILERS, path, error)
                self._record(path, CLIENT_REFUSED_TRAILERS)
                return
            if error.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                self._sample(error.code().name, path, error)
            self._record(path, error.code())

    async def _stream_call(self, channel: grpc.aio.Channel, path: str, method: MethodDescriptor) -> None:
        """A Connect stream: a register first most of the time, then a few fuzzed messages."""
        rng = self.rng

        async def requests() -> AsyncIterator[bytes]:
            if rng.random() < 0.7:
                register = worker_service_pb2.ConnectRequest()
                register.register.worker_id = "fuzzer"
                register.register.credits = rng.randrange(0, 3)
                register.register.job_types.add(type=rng.choice(["fuzz.type", "test.echo"]))
                yield register.SerializeToString()
            for _ in range(rng.randrange(1, 6)):
                yield self.request_bytes(method)
                await asyncio.sleep(0)

        call = channel.stream_stream(path)(requests(), timeout=0.5, metadata=self.metadata())
        try:
            async for _ in call:
                pass
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled ourselves
            # grpcio cancels the call itself when it cannot send a request (one past the channel's
            # message limit): the server never saw it.
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), CLIENT_SEND_FAILED
            ) from None

    async def run(self, calls: int, concurrency: int = 8) -> Counter[str]:
        options = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
        async with grpc.aio.insecure_channel(self.target, options=options) as channel:
            await self._seed_jobs(channel)
            plan = [self.rng.choice(self.methods) for _ in range(calls)]
            for start in range(0, calls, concurrency):
                wave = plan[start : start + concurrency]
                await asyncio.gather(*(self.call(channel, path, method) for path, method in wave))
        return self.codes
