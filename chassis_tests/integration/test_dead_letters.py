"""Dead letters keep the original byte for byte, whatever it is, and never take a worker down.

Every hostile message is published with the raw protocol (``raw_nats``), so nothing in nats-py
filters it: a payload 64 bytes under ``max_payload``, a header name outside the HTTP token set,
headers a few hundred bytes under JetStream's 64 KiB limit, non-ASCII and invalid UTF-8 header
values, duplicate names, a field name like ``élan_ключ`` in the validation error. Each ends in the
DLQ; ``dlq list``, ``dlq list --json`` and ``dlq show`` display it; ``dlq replay`` republishes
the same payload and header bytes (read back raw from the work stream); the worker handles a good
job afterwards on the same connection. A hypothesis property runs the whole round trip on a
server with a small ``max_payload``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from raw_nats import RawNats, header_block, header_pairs, stored_message
from worker_testkit import (
    PACKAGE,
    WorkerEnv,
    WorkerProcess,
    free_port,
    port_open,
    wait_until,
)

from {{ cookiecutter.__package_name }}.job import Job
from {{ cookiecutter.__package_name }}.runtime.consume import dlq
from {{ cookiecutter.__package_name }}.runtime.operate import cli
from {{ cookiecutter.__package_name }}.runtime.operate.embedded import find_binary, stop_process

pytestmark = pytest.mark.integration

EXIT_DATAERR = 65
EXIT_CONFIG = 78
SMALL_MAX_PAYLOAD = 64 * 1024
HEADER_LIMIT = 65535


# ------------------------------------------------------------------------------------ helpers


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def raw_publish(url: str, subject: str, data: bytes, block: bytes) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        async with await RawNats.connect(url) as raw:
            assert len(block) + len(data) <= raw.max_payload
            ack = await raw.js_publish(subject, data, block)
            assert not raw.errors, raw.errors
            return ack

    ack: dict[str, Any] = run(go())
    assert "error" not in ack, ack
    return ack


def stored(url: str, stream: str) -> list[Any]:
    """Every message of a stream, with exact header bytes."""

    async def go() -> list[Any]:
        async with await RawNats.connect(url) as raw:
            info = json.loads((await raw.request(f"$JS.API.STREAM.INFO.{stream}", b"")).data)
            state = info["state"]
            found = []
            for seq in range(state["first_seq"], state["last_seq"] + 1):
                msg = await stored_message(raw, stream, seq)
                if msg is not None:
                    found.append(msg)
            return found

    result: list[Any] = run(go())
    return result


def entries(env: WorkerEnv) -> list[dlq.DeadLetter]:
    async def go(js: Any) -> list[dlq.DeadLetter]:
        return [e async for e in dlq.iter_dead_letters(js, env.settings())]

    return env.js(go)


def one_line_error(result: subprocess.CompletedProcess[str], exit_code: int) -> str:
    assert result.returncode == exit_code, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{result.stderr[-2000:]}"
    return lines[0]


def cli_bytes(env: WorkerEnv, *args: str) -> bytes:
    """The CLI's exact stdout bytes (for ``dlq show --raw``)."""
    result = subprocess.run(
        [sys.executable, "-m", PACKAGE, *args],
        env=env.environ(),
        cwd=env.workdir,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def no_crash(proc: WorkerProcess) -> None:
    assert proc.proc is not None
    assert proc.proc.poll() is None, proc.tail()
    assert not proc.non_json_lines(), proc.non_json_lines()[:5]
    assert not proc.find(lambda r: r.get("level") in ("error", "critical")), proc.tail()
    assert not proc.find(lambda r: "connection closed" in str(r.get("msg", ""))), proc.tail()


def without_ids(block: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in header_pairs(block) if n.lower() != b"nats-msg-id"]


def hostile_cases(max_payload: int) -> dict[str, tuple[bytes, bytes]]:
    """name -> (header block, payload), each one dead-lettered as 'invalid'."""

    def block(name: str, *pairs: tuple[bytes, bytes]) -> bytes:
        return header_block([(b"Nats-Msg-Id", f"case-{name}".encode()), *pairs])

    near = block("near-max-payload")
    pad_to = HEADER_LIMIT - 300
    base = block("header-limit", (b"X-Pad", b""))
    limit = block("header-limit", (b"X-Pad", b"p" * (pad_to - len(base))))
    assert len(limit) == pad_to
    return {
        "near-max-payload": (near, b"x" * (max_payload - 64 - len(near))),
        "odd-name": (block("odd-name", (b"X-Odd(name)/@=", b"odd value")), b"not json"),
        "header-limit": (limit, b"not json either"),
        "non-ascii": (
            block(
                "non-ascii",
                (b"X-Name", "café".encode()),
                (b"X-Bytes", b"\xff\xfe\x80 raw"),
                (b"X-Dup", b"1"),
                (b"X-Dup", b"2"),
                (b"X-Space", b"  padded  "),
            ),
            b"\xff\x00 not utf-8",
        ),
        "field-name": (block("field-name"), '{"id": "f", "élan_ключ": 1}'.encode()),
    }


# ------------------------------------------------------------------------------------ cases


@pytest.mark.timeout(120)
def test_hostile_messages_end_readable_in_the_dlq_and_replay_exactly(
    worker_env: WorkerEnv,
) -> None:
    worker_env.provision()
    proc = worker_env.spawn()

    async def max_payload() -> int:
        async with await RawNats.connect(worker_env.url) as raw:
            return raw.max_payload

    cases = hostile_cases(run(max_payload()))
    for block, data in cases.values():
        raw_publish(worker_env.url, worker_env.ingress, data, block)
    worker_env.publish([{"id": "good-after-hostile"}])
    proc.wait_done(["good-after-hostile"])

    wait_until(
        lambda: len(entries(worker_env)) == len(cases),
        30,
        f"{len(cases)} DLQ entries",
        details=proc.tail,
    )
    by_id = {e.summary["msg_id"]: e for e in entries(worker_env)}
    assert set(by_id) == {f"case-{name}" for name in cases}
    for name, (block, data) in cases.items():
        entry = by_id[f"case-{name}"]
        assert entry.problem is None, (name, entry.problem)
        assert entry.original_headers == block, name
        assert entry.data == data, name
        assert entry.headers[dlq.H_REASON] == "invalid", (name, entry.headers)
    assert by_id["case-near-max-payload"].parts, "a payload near max_payload needs parts"
    part = str(by_id["case-near-max-payload"].parts[0])
    line = one_line_error(worker_env.run_cli(["dlq", "show", "--seq", part]), EXIT_DATAERR)
    assert "is a part of entry" in line, line
    assert "élan_ключ" in by_id["case-field-name"].headers[dlq.H_ERROR]

    # list: one readable line per entry
    listing = worker_env.cli_ok("dlq", "list")
    lines = listing.strip().splitlines()
    assert len(lines) == 1 + len(cases), listing
    assert all(line.isprintable() for line in lines), listing
    assert "élan_ключ" in listing

    # list --json: previews and original headers, never a crash
    listed = {e["msg_id"]: e for e in json.loads(worker_env.cli_ok("dlq", "list", "--json"))}
    odd = listed["case-odd-name"]
    assert {"name": "X-Odd(name)/@=", "value": "odd value"} in odd["original_headers"]
    assert odd["payload_preview"] == {"text": "not json", "truncated": False}
    bad = listed["case-non-ascii"]
    assert {"name": "X-Name", "value": "café"} in bad["original_headers"]
    assert {"name": "X-Bytes", "value": "\\xff\\xfe\\x80 raw"} in bad["original_headers"]
    assert "base64" in bad["payload_preview"]
    assert listed["case-near-max-payload"]["payload_preview"]["truncated"] is True

    # show: every header decoded, payload pretty or escaped; --raw gives the exact bytes
    for name, (_block, data) in cases.items():
        seq = str(by_id[f"case-{name}"].seq)
        shown = worker_env.cli_ok("dlq", "show", "--seq", seq)
        assert f"case-{name}" in shown
        assert all(line.isprintable() for line in shown.splitlines()), shown[:2000]
        assert cli_bytes(worker_env, "dlq", "show", "--seq", seq, "--raw") == data
    shown = worker_env.cli_ok("dlq", "show", "--seq", str(by_id["case-non-ascii"].seq))
    for expected in ("X-Name: café", "X-Bytes: \\xff\\xfe\\x80 raw", "X-Dup: 1", "X-Dup: 2"):
        assert expected in shown, shown
    assert '"élan_ключ": 1' in worker_env.cli_ok(
        "dlq", "show", "--seq", str(by_id["case-field-name"].seq)
    )
    # a terminal that cannot show UTF-8 gets escapes, not a crash
    field_seq = str(by_id["case-field-name"].seq)
    for args in (["dlq", "list"], ["dlq", "list", "--json"], ["dlq", "show", "--seq", field_seq]):
        result = worker_env.run_cli(args, env={"PYTHONIOENCODING": "ascii"})
        assert result.returncode == 0, result.stderr[-2000:]
        assert "\\u" in result.stdout or "\\x" in result.stdout, result.stdout[:500]
    no_crash(proc)
    assert proc.stop() == 0

    # replay: the same payload and header bytes, plus the documented bookkeeping
    assert f"replayed {len(cases)} job(s)" in worker_env.cli_ok("dlq", "replay", "--all")
    assert entries(worker_env) == []
    replayed = {}
    for msg in stored(worker_env.url, worker_env.stream):
        pairs = dict(header_pairs(msg.headers))
        replayed[int(pairs[b"Dlq-Replayed-From"])] = msg
    assert len(replayed) == len(cases)
    for name, (block, data) in cases.items():
        entry = by_id[f"case-{name}"]
        msg = replayed[entry.seq]
        assert msg.data == data, name
        original_id = f"case-{name}".encode()
        assert without_ids(msg.headers) == [
            *without_ids(block),
            (b"Job-Id", original_id),
            (b"Dlq-Replayed-From", str(entry.seq).encode()),
        ], name
        assert dict(header_pairs(msg.headers))[b"Nats-Msg-Id"] == original_id + (
            b":replay:" + str(entry.seq).encode()
        )

    # a new worker dead-letters the replays again, exactly, and still handles good work
    proc = worker_env.spawn()
    worker_env.publish([{"id": "good-after-replay"}])
    proc.wait_done(["good-after-replay"])
    wait_until(lambda: len(entries(worker_env)) == len(cases), 30, "the replays dead-lettered")
    for entry in entries(worker_env):
        replay_of = int(dict(header_pairs(entry.original_headers))[b"Dlq-Replayed-From"])
        assert entry.original_headers == replayed[replay_of].headers
        assert entry.data == replayed[replay_of].data
    no_crash(proc)
    assert proc.stop() == 0


@pytest.mark.timeout(60)
def test_the_max_deliveries_rescue_keeps_odd_headers_exactly(worker_env: WorkerEnv) -> None:
    worker_env.provision()
    block = header_block([(b"X-Odd(name)/@=", "café \xff".encode("latin-1")), (b"A", b"1")])
    ack = raw_publish(worker_env.url, worker_env.ingress, b"poison", block)

    async def rescue(js: Any) -> None:
        await dlq.MaxDeliveriesRescue(js, worker_env.settings()).rescue(int(ack["seq"]), 5)

    worker_env.js(rescue)
    [entry] = entries(worker_env)
    assert entry.headers[dlq.H_REASON] == "max_deliveries"
    assert entry.headers[dlq.H_DELIVERIES] == "5"
    assert entry.original_headers == block
    assert entry.data == b"poison"
    assert worker_env.stored() == 0


@pytest.mark.timeout(60)
def test_dlq_commands_on_a_missing_dlq_stream_say_run_provision(worker_env: WorkerEnv) -> None:
    for args in (["dlq", "list"], ["dlq", "list", "--json"], ["dlq", "show", "--seq", "1"]):
        line = one_line_error(worker_env.run_cli(args), EXIT_CONFIG)
        assert worker_env.dlq_stream in line, line
        assert "provision" in line, line
    worker_env.provision()
    line = one_line_error(worker_env.run_cli(["dlq", "show", "--seq", "99"]), EXIT_DATAERR)
    assert "no DLQ entry with seq 99" in line, line


@pytest.mark.timeout(60)
def test_an_entry_written_before_dlq_format_still_lists_shows_and_replays(
    worker_env: WorkerEnv,
) -> None:
    """The old layout: original headers inline next to the Dlq-* ones, raw UTF-8 in Dlq-Error."""
    worker_env.provision()
    block = header_block(
        [
            (b"X-Name", "café".encode()),
            (b"Dlq-Reason", b"invalid"),
            (b"Dlq-Error-Type", b"ValidationError"),
            (b"Dlq-Error", "élan_ключ: Extra inputs are not permitted".encode()),
            (b"Dlq-Deliveries", b"1"),
            (b"Dlq-Msg-Id", b"old-1"),
            (b"Nats-Msg-Id", b"dlq:OLD:7"),
        ]
    )
    ack = raw_publish(worker_env.url, worker_env.settings().names.dlq_subject, b"old", block)
    listing = worker_env.cli_ok("dlq", "list")
    assert "élan_ключ" in listing, listing
    assert "old-1" in listing, listing
    [listed] = json.loads(worker_env.cli_ok("dlq", "list", "--json"))
    assert listed["format"] == "legacy"
    assert {"name": "X-Name", "value": "café"} in listed["original_headers"]
    assert "X-Name: café" in worker_env.cli_ok("dlq", "show", "--seq", str(ack["seq"]))
    assert "replayed 1 job(s)" in worker_env.cli_ok("dlq", "replay", "--all")
    [msg] = stored(worker_env.url, worker_env.stream)
    assert msg.data == b"old"
    assert header_pairs(msg.headers) == [
        (b"X-Name", "café".encode()),
        (b"Nats-Msg-Id", f"old-1:replay:{ack['seq']}".encode()),
        (b"Job-Id", b"old-1"),
        (b"Dlq-Replayed-From", str(ack["seq"]).encode()),
    ]


# ------------------------------------------------------------------------------------ property


@pytest.fixture
def small_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clean_env: None
) -> Iterator[WorkerEnv]:
    """A nats-server of this test's own with max_payload 64 KiB, and a topology on it."""
    port = free_port()
    conf = tmp_path / "small.conf"
    store = tmp_path / "small-store"
    conf.write_text(
        f'listen: "127.0.0.1:{port}"\n'
        f"max_payload: {SMALL_MAX_PAYLOAD}\n" + 'jetstream { store_dir: "' + str(store) + '" }\n'
    )
    log = tmp_path / "small-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [find_binary(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_until(lambda: port_open(port), 15, "the small nats-server", details=log.read_text)
        env = WorkerEnv(f"nats://127.0.0.1:{port}", "small", tmp_path)
        for name, value in env.vars.items():
            monkeypatch.setenv(name, value)
        env.on_change = monkeypatch.setenv
        try:
            yield env
        finally:
            env.close()
    finally:
        stop_process(proc, 15)


def in_process(*args: str) -> tuple[int, bytes]:
    """The CLI in this process (a subprocess per example would be too slow): code, stdout."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    with contextlib.redirect_stdout(out):
        code = cli.main(list(args))
    out.flush()
    return code, out.buffer.getvalue()


# Any byte but blanks, controls and the colon: the server takes names nats-py refuses.
NAME_BYTES = [c for c in range(0x21, 0x100) if c != ord(":") and c != 0x7F]
header_names = st.binary(min_size=1, max_size=12).map(
    lambda b: bytes(NAME_BYTES[c % len(NAME_BYTES)] for c in b)
)
header_values = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def is_job(data: bytes) -> bool:
    try:
        Job.model_validate_json(data)
    except Exception:
        return False
    return True


Pairs = list[tuple[bytes, bytes]]
Message = tuple[Pairs, bytes, int]  # headers, the payload's first bytes, filler bytes after them


@st.composite
def messages(draw: st.DrawFn) -> Message:
    """Small to describe (hypothesis prints it), up to max_payload once built (:func:`build`)."""
    pairs = draw(st.lists(st.tuples(header_names, header_values), max_size=8))
    # JetStream acts on Nats-* headers, and a replay rewrites Dlq-Replayed-From: leave those out.
    pairs = [(n, v) for n, v in pairs if not n.lower().startswith((b"nats", b"dlq-"))]
    room = SMALL_MAX_PAYLOAD - len(header_block(pairs))
    head = draw(st.binary(max_size=64))
    filler = draw(st.one_of(st.integers(0, 512), st.integers(room - 256, room)))
    return pairs, head, filler


def build(message: Message) -> tuple[bytes, bytes]:
    """The header block and payload, cut to fit max_payload together."""
    pairs, head, filler = message
    block = header_block(pairs)
    return block, (head + b"\xa5" * max(0, filler))[: SMALL_MAX_PAYLOAD - len(block)]


@pytest.mark.timeout(120)
def test_any_message_round_trips_through_the_dlq(small_env: WorkerEnv) -> None:
    env = small_env
    env.provision()
    proc = env.spawn()
    seen: Counter[str] = Counter()
    big_header = [(b"X-Big", b"b" * 50_000)]
    odd = [(b"X-Odd(name)/@=", b" \xff caf\xc3\xa9 "), (b"X-Odd(name)/@=", b"")]

    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(message=messages())
    @example(message=(big_header, b"\x00", 100))  # the blob form
    @example(message=(odd, b"", SMALL_MAX_PAYLOAD))  # parts, no room for the replay's bookkeeping
    @example(message=([], b"", SMALL_MAX_PAYLOAD - 200))  # parts, the bookkeeping fits
    @example(message=([], b"", SMALL_MAX_PAYLOAD))  # no headers at all, none added on replay
    def round_trip(message: Message) -> None:
        block, data = build(message)
        if is_job(data):
            return
        seen["examples"] += 1
        ack = raw_publish(env.url, env.ingress, data, block)
        first = wait_until(
            lambda: [e for e in entries(env) if e.headers[dlq.H_SEQUENCE] == str(ack["seq"])],
            15,
            "the dead letter",
            details=proc.tail,
        )[0]
        assert first.problem is None, first.problem
        assert (first.original_headers, first.data) == (block, data)
        seen[first.form + (" in parts" if first.parts else "")] += 1

        code, shown = in_process("dlq", "show", "--seq", str(first.seq))
        assert code == 0
        assert all(line.isprintable() for line in shown.decode().splitlines())
        assert in_process("dlq", "show", "--seq", str(first.seq), "--raw") == (0, data)
        assert in_process("dlq", "list", "--json")[0] == 0

        assert in_process("dlq", "replay", "--seq", str(first.seq))[0] == 0
        second = wait_until(
            lambda: [e for e in entries(env) if e.seq > first.seq], 15, "the replay dead-lettered"
        )[0]
        assert second.data == data
        bookkeeping = [
            (b"Nats-Msg-Id", f"job:replay:{first.seq}".encode()),
            (b"Dlq-Replayed-From", str(first.seq).encode()),
        ]
        full = header_block([*header_pairs(block), *bookkeeping])
        if len(full) + len(data) <= SMALL_MAX_PAYLOAD:
            assert second.original_headers == full
            seen["replayed with the bookkeeping"] += 1
        else:  # no room for the bookkeeping: the original goes out unchanged
            assert second.original_headers == block
            seen["replayed unchanged"] += 1
        assert in_process("dlq", "purge", "--yes")[0] == 0

    round_trip()
    assert seen["examples"] >= 20, seen
    for covered in ("inline", "blob", "inline in parts", "replayed unchanged"):
        assert seen[covered], (covered, seen)
    env.publish([{"id": "good-after-property"}])
    proc.wait_done(["good-after-property"])
    no_crash(proc)
    assert proc.stop() == 0


@pytest.mark.timeout(60)
def test_an_entry_with_a_missing_part_is_shown_and_stays_in_the_dlq(small_env: WorkerEnv) -> None:
    env = small_env
    env.provision()
    proc = env.spawn()
    data = b"\xa5" * (SMALL_MAX_PAYLOAD - 100)
    raw_publish(env.url, env.ingress, data, header_block([(b"X-Odd(name)/@=", b"1")]))
    [entry] = wait_until(lambda: entries(env), 15, "the dead letter", details=proc.tail)
    assert entry.parts
    assert entry.data == data

    async def lose_a_part(js: Any) -> None:
        await js.delete_msg(env.dlq_stream, entry.parts[-1])

    env.js(lose_a_part)
    [listed] = json.loads(env.cli_ok("dlq", "list", "--json"))
    assert "missing" in str(listed["problem"]), listed
    assert "missing" in env.cli_ok("dlq", "list")
    assert "PROBLEM" in env.cli_ok("dlq", "show", "--seq", str(entry.seq))
    line = one_line_error(env.run_cli(["dlq", "replay", "--all"]), EXIT_DATAERR)
    assert f"DLQ entry {entry.seq} stays in the DLQ" in line, line
    assert [e.seq for e in entries(env)] == [entry.seq]
    assert env.stored() == 0  # nothing half-replayed
    no_crash(proc)
    assert proc.stop() == 0
