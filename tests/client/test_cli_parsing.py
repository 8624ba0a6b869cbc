"""Unit tests of the SDK and CLI parts that need no Jobwire server.

Parameter, label and state parsing; request building; the retry and watch-resume decisions; and the
conversion of a real gRPC error with rich details (from a tiny generic grpc.aio server) into typed
exceptions.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from jobwire.cli.main import build_parser, main
from jobwire.cli.parsing import UsageError, label_arg, labels_dict, parse_params, parse_value, state_arg
from jobwire.client import (
    InvalidArgumentError,
    JobFailedError,
    JobwireError,
    NotFoundError,
    OutOfRangeError,
    UnavailableError,
    _core,  # the shared, I/O-free policies
    from_rpc_error,
    is_terminal,
    job_params,
    job_result,
    parse_state,
    state_name,
)
from jobwire.client.errors import DeadlineExceededError
from jobwire.v1 import job_pb2, job_service_pb2

# --- params, labels, states ---------------------------------------------------------------------------


def test_key_value_params_parse_json_values_and_fall_back_to_strings() -> None:
    params = parse_params(
        [
            "seconds=2",
            "ratio=0.5",
            "on=true",
            "off=false",
            "nothing=null",
            "tags=[1,2]",
            "name=world",
            'q="7"',
        ]
    )
    assert params == {
        "seconds": 2,
        "ratio": 0.5,
        "on": True,
        "off": False,
        "nothing": None,
        "tags": [1, 2],
        "name": "world",
        "q": "7",
    }


def test_value_may_contain_equals_and_be_empty() -> None:
    assert parse_params(["expr=a=b", "empty="]) == {"expr": "a=b", "empty": ""}


def test_json_object_params_merge_with_key_values_in_order() -> None:
    assert parse_params(['{"seconds": 2, "steps": 4}']) == {"seconds": 2, "steps": 4}
    assert parse_params(['{"seconds": 2}', "seconds=3", "x=y"]) == {"seconds": 3, "x": "y"}


@pytest.mark.parametrize("item", ["novalue", "=3", "{not json", "{}x", "[1]"])
def test_bad_params_are_usage_errors(item: str) -> None:
    with pytest.raises(UsageError):
        parse_params([item])


def test_nan_is_a_string_not_a_number() -> None:
    assert parse_value("NaN") == "NaN"
    assert parse_value("Infinity") == "Infinity"


def test_label_parsing() -> None:
    assert label_arg("team=ml") == ("team", "ml")
    assert label_arg("k=") == ("k", "")
    assert label_arg("url=a=b") == ("url", "a=b")
    assert labels_dict([("a", "1"), ("b", "2"), ("a", "3")]) == {"a": "3", "b": "2"}
    assert labels_dict(None) == {}
    for bad in ("novalue", "=v"):
        with pytest.raises(argparse.ArgumentTypeError):
            label_arg(bad)


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("queued", job_pb2.JOB_STATE_QUEUED),
        ("RUNNING", job_pb2.JOB_STATE_RUNNING),
        ("Succeeded", job_pb2.JOB_STATE_SUCCEEDED),
        ("failed", job_pb2.JOB_STATE_FAILED),
        ("cancelled", job_pb2.JOB_STATE_CANCELLED),
        ("job_state_cancelling", job_pb2.JOB_STATE_CANCELLING),
    ],
)
def test_state_names(text: str, state: int) -> None:
    assert state_arg(text) == state
    assert parse_state(text) == state
    assert state_name(state) == text.lower().removeprefix("job_state_")


@pytest.mark.parametrize("bad", ["unspecified", "JOB_STATE_UNSPECIFIED", "done", ""])
def test_unknown_or_unspecified_states_are_rejected(bad: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected one of: queued"):
        state_arg(bad)
    with pytest.raises(ValueError):
        parse_state(bad)
    with pytest.raises(ValueError):
        parse_state(0)


def test_is_terminal() -> None:
    assert [s for s in job_pb2.JobState.values() if is_terminal(s)] == [
        job_pb2.JOB_STATE_SUCCEEDED,
        job_pb2.JOB_STATE_FAILED,
        job_pb2.JOB_STATE_CANCELLED,
    ]


def test_cli_parser_reads_repeatable_filters() -> None:
    args = build_parser({}).parse_args(
        ["list", "--state", "queued", "--state", "running", "--type", "a", "--label", "k=v", "--json"]
    )
    assert args.state == [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING]
    assert args.types == ["a"]
    assert args.label == [("k", "v")]
    assert args.json is True
    assert args.limit == 20


def test_cli_global_options_come_from_the_environment_and_either_side_of_the_command() -> None:
    env = {"JOBWIRE_SERVER": "example:1234", "JOBWIRE_TOKEN": "s3cret"}
    args = build_parser(env).parse_args(["stats"])
    assert (args.server, args.token, args.json) == ("example:1234", "s3cret", False)
    args = build_parser(env).parse_args(["--server", "a:1", "stats", "--json"])
    assert (args.server, args.json) == ("a:1", True)
    args = build_parser({}).parse_args(["stats", "--server", "b:2"])
    assert args.server == "b:2"
    assert build_parser({}).parse_args(["get", "x"]).server == "localhost:50051"


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["list", "--state", "done"])
    assert exc.value.code == 2
    assert "unknown job state" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--server", "127.0.0.1:1", "submit", "demo.sleep", "oops"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["get"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--bogus", "list"], "unrecognized arguments: --bogus"),
        (["--server", "localhost:99999", "list"], "not a port: '99999'"),
        (["list", "--server", "h:0"], "not a port: '0'"),
        (["--bogus", "serve"], "unrecognized arguments: --bogus"),
    ],
)
def test_cli_names_what_is_wrong(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err


def test_cli_server_targets_that_are_fine() -> None:
    parser = build_parser({})
    for target in ("localhost:50051", "[::1]:50051", "dns:///jobs.internal:50051", "a:1,b:2", "unix:/tmp/s"):
        assert parser.parse_args(["--server", target, "stats"]).server == target


def test_cli_help_works_without_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "submit", "get", "list", "cancel", "watch", "stats"):
        assert command in out


# --- request building -------------------------------------------------------------------------------


def test_submit_request_always_has_a_request_id_and_converts_types() -> None:
    request = _core.build_submit_request(
        "demo.sleep", {"seconds": 2, "nested": {"a": [1, "b"]}}, priority=7, labels={"k": "v"}, timeout=1.5
    )
    assert len(request.request_id) == 36
    assert request.params["seconds"] == 2
    assert json_format.MessageToDict(request.params)["nested"] == {"a": [1, "b"]}
    assert request.HasField("priority") and request.priority == 7
    assert request.timeout == duration_pb2.Duration(seconds=1, nanos=500_000_000)
    assert dict(request.labels) == {"k": "v"}
    assert _core.build_submit_request("t").request_id != _core.build_submit_request("t").request_id

    bare = _core.build_submit_request("t", request_id="mine", timeout=datetime.timedelta(minutes=2))
    assert bare.request_id == "mine"
    assert not bare.HasField("params") and not bare.HasField("priority")
    assert bare.timeout.seconds == 120


def test_params_that_are_not_json_fail_before_any_call() -> None:
    with pytest.raises(InvalidArgumentError) as exc:
        _core.build_submit_request("t", {"when": object()})
    assert exc.value.field_violations[0][0] == "params"


def test_list_request_accepts_state_names_and_datetimes() -> None:
    start = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    request = _core.build_list_request(
        states=["queued", job_pb2.JOB_STATE_FAILED], types=("a",), create_time_start=start, page_size=2
    )
    assert list(request.states) == [job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_FAILED]
    assert request.create_time_start.ToDatetime(tzinfo=datetime.UTC) == start
    assert not request.HasField("create_time_end")
    assert request.page_size == 2
    with pytest.raises(InvalidArgumentError):
        _core.build_list_request(states=["nope"])
    single = _core.build_list_request(states="running", types="demo.sleep")
    assert list(single.states) == [job_pb2.JOB_STATE_RUNNING]
    assert list(single.types) == ["demo.sleep"]


def test_bearer_token_metadata() -> None:
    assert _core.call_metadata("abc") == (("authorization", "Bearer abc"),)
    assert _core.call_metadata(None) == ()


def test_job_helpers() -> None:
    job = job_pb2.Job(id="j")
    assert job_result(job) is None
    assert job_params(job) == {}
    job.result.update({"x": 1})
    job.params.update({"seconds": 2})
    assert job_result(job) == {"x": 1.0}
    assert job_params(job) == {"seconds": 2.0}


# --- retry and watch policies (no I/O) --------------------------------------------------------------


class FakeRpcError(grpc.RpcError):  # type: ignore[misc]
    """Stands in for a failed call in the policy tests."""

    def __init__(self, code: Any, details: str = "") -> None:
        super().__init__(details)
        self._code = code
        self._details = details

    def code(self) -> Any:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:
        return ()


def test_submit_retries_only_unavailable_with_growing_delays() -> None:
    policy = _core.RetryPolicy(max_attempts=4, backoff=_core.Backoff(initial=0.1, jitter=0.0))
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE)
    assert [policy.delay_after(n, unavailable) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, None]
    assert policy.delay_after(1, FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)) is None
    assert _core.SUBMIT_RETRY.delay_after(1, unavailable) is not None


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _update(
    sequence: int, state: job_pb2.JobState.ValueType = job_pb2.JOB_STATE_RUNNING
) -> job_service_pb2.WatchJobResponse:
    return job_service_pb2.WatchJobResponse(job=job_pb2.Job(id="j", state=state), sequence=sequence)


def test_watch_tracker_resumes_after_last_sequence_and_skips_replays() -> None:
    clock = FakeClock()
    tracker = _core.WatchTracker("j", clock=clock, backoff=_core.Backoff(jitter=0.0))
    assert tracker.request().after_sequence == 0
    assert tracker.accept(_update(3))
    assert tracker.accept(_update(5))
    delay = tracker.on_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed"))
    assert delay == pytest.approx(0.1)
    assert tracker.request().after_sequence == 5
    assert not tracker.accept(_update(5))  # a replay the caller has already seen
    assert tracker.accept(_update(6, job_pb2.JOB_STATE_SUCCEEDED))
    assert tracker.finished and tracker.last_job is not None


def test_watch_tracker_treats_torn_streams_like_unavailable() -> None:
    tracker = _core.WatchTracker("j", clock=FakeClock())
    tracker.request()
    tracker.on_error(FakeRpcError(grpc.StatusCode.INTERNAL, "Received RST_STREAM with error code 2"))
    tracker.on_stream_end()  # ended OK before the terminal state
    with pytest.raises(InvalidArgumentError):
        tracker.on_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad"))


def test_watch_tracker_gives_up_after_its_retry_window() -> None:
    clock = FakeClock()
    tracker = _core.WatchTracker("j", clock=clock, retry_window=30.0)
    tracker.request()
    assert tracker.accept(_update(1))  # the stream worked, then broke: the whole window applies
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")
    tracker.on_error(unavailable)
    clock.now += 29.0
    tracker.on_error(unavailable)
    clock.now += 2.0
    with pytest.raises(UnavailableError):
        tracker.on_error(unavailable)


def test_watch_tracker_gives_up_early_on_a_server_it_never_reached() -> None:
    clock = FakeClock()
    tracker = _core.WatchTracker("j", clock=clock, retry_window=30.0, backoff=_core.Backoff(jitter=0.0))
    tracker.request()
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    waited = 0.0
    with pytest.raises(UnavailableError):
        while True:
            delay = tracker.on_error(unavailable)
            clock.now += delay
            waited += delay
    assert waited == pytest.approx(_core.WATCH_FIRST_CONTACT_WINDOW)  # not the 30 s retry window


def test_watch_tracker_failure_window_resets_on_progress() -> None:
    clock = FakeClock()
    tracker = _core.WatchTracker("j", clock=clock, retry_window=30.0)
    tracker.request()
    unavailable = FakeRpcError(grpc.StatusCode.UNAVAILABLE)
    tracker.on_error(unavailable)
    clock.now += 25.0
    tracker.request()
    assert tracker.accept(_update(1))
    clock.now += 25.0
    tracker.on_error(unavailable)  # a new streak: no give-up yet


def test_watch_tracker_restarts_from_a_snapshot_on_out_of_range() -> None:
    tracker = _core.WatchTracker("j", after_sequence=40, clock=FakeClock())
    assert tracker.request().after_sequence == 40
    assert tracker.on_error(FakeRpcError(grpc.StatusCode.OUT_OF_RANGE, "lost")) == 0.0
    assert tracker.request().after_sequence == 0
    assert tracker.accept(_update(12))  # the fresh snapshot is yielded even though 12 < 40
    # OUT_OF_RANGE for a watch from 0 cannot be fixed by restarting.
    fresh = _core.WatchTracker("j", clock=FakeClock())
    fresh.request()
    with pytest.raises(OutOfRangeError):
        fresh.on_error(FakeRpcError(grpc.StatusCode.OUT_OF_RANGE, "lost"))


def test_watch_tracker_deadline_is_client_side() -> None:
    clock = FakeClock()
    tracker = _core.WatchTracker("j", timeout=5, clock=clock)
    tracker.request()
    assert tracker.call_timeout() == pytest.approx(5.0)
    clock.now += 2
    assert tracker.call_timeout() == pytest.approx(3.0)
    with pytest.raises(DeadlineExceededError, match="within 5 s"):
        tracker.on_error(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED))
    clock.now += 4
    with pytest.raises(DeadlineExceededError):
        tracker.request()


def test_job_failed_error_reads_the_job_error() -> None:
    job = job_pb2.Job(id="j", state=job_pb2.JOB_STATE_FAILED)
    job.error.code = code_pb2.UNKNOWN
    job.error.message = "ValueError: boom"
    job.error.details.add().Pack(error_details_pb2.ErrorInfo(reason="HANDLER_ERROR", domain="jobwire.dev"))
    err = JobFailedError(job)
    assert err.job is job
    assert err.code == grpc.StatusCode.UNKNOWN
    assert err.reason == "HANDLER_ERROR"
    assert "boom" in err.message and "FAILED" in err.message


# --- error conversion from a real gRPC error --------------------------------------------------------

SERVICE = "jobwire.test.Errors"


def _rich_status() -> status_pb2.Status:
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="unknown job type 'nope'")
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(
            reason="UNKNOWN_JOB_TYPE", domain="jobwire.dev", metadata={"type": "nope"}
        )
    )
    bad = error_details_pb2.BadRequest()
    bad.field_violations.add(field="type", description="no handler named 'nope'")
    bad.field_violations.add(field="priority", description="must be 0 to 9")
    status.details.add().Pack(bad)
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2)))
    return status


async def _fail_rich(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort_with_status(rpc_status.to_status(_rich_status()))
    raise AssertionError("unreachable")


async def _fail_plain(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such job")
    raise AssertionError("unreachable")


async def _fail_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"first"
    await context.abort_with_status(rpc_status.to_status(_rich_status()))


@pytest.fixture
async def error_target() -> AsyncIterator[str]:
    """A grpc.aio server whose methods fail with known statuses, on a free loopback port."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Rich": grpc.unary_unary_rpc_method_handler(_fail_rich),
                    "Plain": grpc.unary_unary_rpc_method_handler(_fail_plain),
                    "Stream": grpc.unary_stream_rpc_method_handler(_fail_stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _assert_rich(err: JobwireError) -> None:
    assert isinstance(err, InvalidArgumentError)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.message == "unknown job type 'nope'"
    assert err.reason == "UNKNOWN_JOB_TYPE"
    assert err.domain == "jobwire.dev"
    assert err.metadata == {"type": "nope"}
    assert err.field_violations == [("type", "no handler named 'nope'"), ("priority", "must be 0 to 9")]
    assert err.retry_delay == 2.0
    assert str(err) == "INVALID_ARGUMENT: unknown job type 'nope'"


async def test_from_rpc_error_reads_details_of_an_aio_error(error_target: str) -> None:
    async with grpc.aio.insecure_channel(error_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary(f"/{SERVICE}/Rich")(b"")
        _assert_rich(from_rpc_error(raised.value))

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary(f"/{SERVICE}/Plain")(b"")
        plain = from_rpc_error(raised.value)
        assert isinstance(plain, NotFoundError)
        assert (plain.reason, plain.metadata, plain.field_violations) == ("", {}, [])

        received: list[bytes] = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for item in channel.unary_stream(f"/{SERVICE}/Stream")(b""):
                received.append(item)
        assert received == [b"first"]
        _assert_rich(from_rpc_error(raised.value))


async def test_from_rpc_error_reads_details_of_a_sync_error(error_target: str) -> None:
    def call() -> grpc.RpcError:
        with grpc.insecure_channel(error_target) as channel:
            try:
                channel.unary_unary(f"/{SERVICE}/Rich")(b"", timeout=10)
            except grpc.RpcError as err:
                return err
        raise AssertionError("the call succeeded")

    # A blocking call must not run on the loop that serves it.
    _assert_rich(from_rpc_error(await asyncio.to_thread(call)))


def test_cli_prints_server_errors_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing listens on port 1: GetJob fails UNAVAILABLE (only SubmitJob is retried).
    code = main(["--server", "127.0.0.1:1", "get", "00000000000000000000000000"])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: UNAVAILABLE: ")


def test_the_packages_are_typed_for_their_users() -> None:
    """A user's mypy --strict sees the SDK's types only if each package ships py.typed."""
    import importlib.resources

    for package in ("jobwire.client", "jobwire.handlers", "jobwire.cli", "jobwire.worker", "jobwire.v1"):
        assert importlib.resources.files(package).joinpath("py.typed").is_file(), package
