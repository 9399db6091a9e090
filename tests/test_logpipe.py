"""The log pipeline: service output and the daemon's own log go through a bounded queue to a
writer thread, so a journal that does not read never stalls the event loop. Unit tests of the
pipeline (bound, priorities, the notice, the flush deadline, the line cap, the formats), the
spawner's output forwarding, the sd_notify sender, and the daemon as a real process whose
stderr is a pipe nobody reads."""

from __future__ import annotations

import asyncio
import fcntl
import io
import itertools
import json
import logging
import os
import re
import signal
import socket
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import Daemon, NotifyListener, base_config, wait_until
from supervisord_llm import logs
from supervisord_llm.errors import SpawnError
from supervisord_llm.logs import (
    LINE_CUT,
    LINE_OVERHEAD,
    JournalFormatter,
    JsonFormatter,
    LogPipeline,
    PipelineHandler,
    TextFormatter,
    forward_output,
    setup_logging,
)
from supervisord_llm.spawn import LaunchSpec, Spawner
from supervisord_llm.systemd import Notifier

NOTICE = re.compile(rb"(\d+) log lines? dropped: the journal did not keep up")


class Sink:
    """A writer for the pipeline that blocks while `gate` is closed (or, with `allow`, once
    it has written the number of chunks it was allowed)."""

    def __init__(self, open_: bool = True) -> None:
        self.gate = threading.Event()
        if open_:
            self.gate.set()
        self.entered = threading.Event()
        self.calls = 0
        self.data = bytearray()
        self._allowed = 0
        self._cond = threading.Condition()

    def allow(self, n: int) -> None:
        with self._cond:
            self._allowed += n
            self._cond.notify_all()

    def write(self, data: bytes) -> None:
        with self._cond:
            self.calls += 1
            self.entered.set()
            while not self.gate.is_set() and self._allowed == 0:
                self._cond.wait(0.05)
            if not self.gate.is_set():
                self._allowed -= 1
            self.data += data

    def lines(self) -> list[bytes]:
        with self._cond:
            return bytes(self.data).splitlines()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink(open_=False)
    yield s
    s.gate.set()  # never leave a writer thread blocked behind


def stalled(sink: Sink, **kw: Any) -> LogPipeline:
    """A pipeline whose writer has taken a first line and now blocks in its write."""
    pipe = LogPipeline(sink.write, **kw)
    pipe.put("first")
    assert sink.entered.wait(5)
    wait_until(lambda: pipe.queued_bytes == len(b"first\n") + LINE_OVERHEAD, 5,
               what="the first line in flight")
    return pipe


# --- the pipeline ----------------------------------------------------------------------------


def test_the_queue_is_bounded_in_bytes_and_drops_the_newest(sink: Sink) -> None:
    pipe = stalled(sink, max_bytes=64 * 1024, reserve_bytes=16 * 1024)
    accepted = []
    for i in range(5000):
        if pipe.put(f"line {i:05d} " + "x" * 40):
            accepted.append(i)
        assert pipe.queued_bytes <= 48 * 1024  # lower lines never use the reserve
    assert pipe.peak_bytes <= 48 * 1024
    assert accepted == list(range(len(accepted)))  # the oldest are kept, the newest dropped
    assert len(accepted) == (48 * 1024 - 134) // (52 + LINE_OVERHEAD)
    assert pipe.dropped == 5000 - len(accepted) and pipe.dropped_urgent == 0
    sink.gate.set()  # the journal reads again
    assert pipe.flush(5)
    lines = sink.lines()
    assert lines[0] == b"first"
    assert [int(x.split()[1]) for x in lines[1:-1]] == accepted
    m = NOTICE.fullmatch(lines[-1])  # said once, after the gap, when everything was written
    assert m is not None and int(m.group(1)) == pipe.dropped
    assert pipe.notices == 1 and pipe.written == len(lines)
    pipe.put("after")
    assert pipe.flush(5) and sink.lines()[-1] == b"after"  # no second notice: nothing new
    assert pipe.close(1)


def test_the_notice_comes_before_the_first_line_that_fits_again(sink: Sink) -> None:
    pipe = stalled(sink, max_bytes=8 * 1024, reserve_bytes=1024)
    n = 0
    while pipe.put(f"a{n}"):
        n += 1
    for _ in range(9):
        assert not pipe.put("lost")
    sink.gate.set()
    wait_until(lambda: pipe.queued_bytes == 0, 5, what="the queue written")
    assert pipe.put("b")
    assert pipe.flush(5)
    lines = sink.lines()
    # the writer emptied the queue first and said so; "b" then needs no second notice
    assert lines[-2:] == [b"10 log lines dropped: the journal did not keep up", b"b"]
    assert pipe.close(1)


def test_a_line_that_fits_after_a_gap_is_preceded_by_the_notice(sink: Sink) -> None:
    pipe = stalled(sink, max_bytes=256 * 1024, reserve_bytes=64 * 1024)
    n = 0
    while pipe.put(f"a{n}"):
        n += 1
    for _ in range(4):
        assert not pipe.put("lost")
    sink.allow(2)  # "first", then one batch: room again, and the writer blocks once more
    wait_until(lambda: sink.calls == 3, 5, what="one batch written")
    assert pipe.put("b")
    sink.gate.set()
    assert pipe.flush(5)
    lines = sink.lines()
    at = lines.index(b"b")
    assert lines[at - 2:at + 1] == [f"a{n - 1}".encode(),
                                    b"5 log lines dropped: the journal did not keep up", b"b"]
    assert lines.count(b"5 log lines dropped: the journal did not keep up") == 1
    assert pipe.close(1)


def test_errors_are_never_dropped_before_info_lines(sink: Sink) -> None:
    pipe = stalled(sink, max_bytes=32 * 1024, reserve_bytes=8 * 1024)
    info = 0
    while pipe.put(f"info {info}"):
        info += 1
    assert not pipe.put("info lost")  # two dropped: this one and the one that ended the loop
    # the reserve takes errors while lower lines are refused
    errors = 0
    while pipe.queued_bytes + 2 * LINE_OVERHEAD <= 32 * 1024:
        assert pipe.put(f"error {errors}", logging.ERROR)
        errors += 1
    assert pipe.dropped == 2 and pipe.dropped_urgent == 0
    # the queue is full: further errors evict the oldest info lines; an error is dropped
    # (the newest) only once no info line is left
    while pipe.put(f"error {errors}", logging.CRITICAL if errors % 2 else logging.ERROR):
        errors += 1
    assert pipe.dropped_urgent == 1
    assert pipe.dropped - pipe.dropped_urgent == info + 2  # every info line went first
    assert pipe.queued_bytes <= 32 * 1024
    sink.gate.set()
    assert pipe.flush(5)
    lines = sink.lines()
    assert [x for x in lines if x.startswith(b"error")] == \
        [f"error {i}".encode() for i in range(errors)]  # every error kept, in order
    assert not any(x.startswith(b"info") for x in lines)
    m = NOTICE.fullmatch(lines[-1])
    assert m is not None and int(m.group(1)) == pipe.dropped == info + 3
    assert pipe.close(1)


def test_flush_has_a_deadline_when_the_writer_blocks(sink: Sink) -> None:
    pipe = stalled(sink)
    for i in range(100):
        pipe.put(f"line {i}", logging.ERROR if i % 10 == 0 else logging.INFO)
    t0 = time.monotonic()
    assert not pipe.flush(0.3)
    assert 0.25 < time.monotonic() - t0 < 2
    t0 = time.monotonic()
    assert not pipe.flush(5)  # the writer is still stuck: not waited for again
    assert not pipe.close(5)
    assert time.monotonic() - t0 < 0.5
    assert not pipe.put("after close")  # refused and counted, no notice for it
    assert pipe.dropped == 1
    sink.gate.set()  # the journal reads again: what was queued is still written
    wait_until(lambda: pipe.written == 101, 5, what="the queue written")
    assert sink.lines()[-1] == b"line 99"
    assert pipe.flush(0)


def test_puts_never_wait_for_a_blocked_writer(sink: Sink) -> None:
    pipe = stalled(sink, max_bytes=256 * 1024, reserve_bytes=64 * 1024)
    t0 = time.monotonic()
    for i in range(20000):
        pipe.put(f"line {i} " + "y" * 100, logging.ERROR if i % 100 == 0 else logging.INFO)
    assert time.monotonic() - t0 < 2
    assert pipe.queued_bytes <= 256 * 1024 and pipe.dropped > 10000
    assert not pipe.close(0)


def test_a_long_line_is_cut_with_a_marker_on_a_character_boundary() -> None:
    sink = Sink()
    pipe = LogPipeline(sink.write, line_cap=1000)
    pipe.put("a" * 5000)
    pipe.put("\u00e9" * 3000)  # two bytes a character
    pipe.put(b"\xe2\x82\xac" * 1000)  # three
    pipe.put("short")
    assert pipe.flush(5)
    lines = sink.lines()
    assert len(lines) == 4 and lines[-1] == b"short"
    for line in lines[:3]:
        assert len(line) <= 1000 and line.endswith(LINE_CUT.encode())
        line.decode("utf-8")  # never a split character
    assert pipe.close(1)


def test_formatters_cap_lines_and_json_stays_valid() -> None:
    big = "\x01" * 20000 + "end"  # escapes make JSON longer than the text
    rec = logging.LogRecord("t", logging.ERROR, __file__, 1, "%s", (big,), None)
    try:
        raise ValueError("x" * 20000)
    except ValueError:
        rec.exc_info = sys.exc_info()
    line = JsonFormatter(4096).format(rec)
    assert len(line.encode()) <= 4096
    doc = json.loads(line)
    assert doc["msg"].endswith(LINE_CUT) and doc["exc"].endswith(LINE_CUT)
    journal = JournalFormatter(4096).format(rec)
    assert len(journal.encode()) <= 4096 and "\n" not in journal
    assert journal.startswith("<3>") and journal.endswith(LINE_CUT)
    text = TextFormatter(4096).format(rec)
    assert len(text.encode()) <= 4096 and text.endswith(LINE_CUT)
    small = logging.LogRecord("t", logging.INFO, __file__, 1, "two\nlines", (), None)
    assert JournalFormatter(4096).format(small) == "<6>two | lines"
    assert JsonFormatter(None).format(rec) == JsonFormatter().format(rec)  # no cap: whole


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Undo setup_logging: its handler removed and closed (pytest adds its own per phase)."""
    root = logging.getLogger()
    level, installed = root.level, logs._installed
    yield
    for h in list(root.handlers):
        if isinstance(h, PipelineHandler):
            root.removeHandler(h)
            h.close()
    root.setLevel(level)
    logs._installed = installed


@pytest.mark.parametrize("fmt", ["journal", "text", "json"])
def test_setup_logging_in_each_format(fmt: str, root_logging: None) -> None:
    out = io.StringIO()  # no file descriptor: written through the stream
    pipe = setup_logging(fmt, logging.INFO, out)
    assert logs.pipeline() is pipe
    log = logging.getLogger("supervisord_llm.test")
    forward = forward_output(logging.getLogger("supervisord_llm.spawn"))
    log.debug("not shown")
    log.warning("careful %d", 1)
    forward("svc", "hello from the service")
    log.info("%s", "z" * 20000)
    log.info("bad %d", "args")  # cannot be formatted: said so, never a traceback
    assert pipe.flush(5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert all(len(x.encode()) <= logs.LINE_CAP for x in lines)
    if fmt == "journal":
        assert lines[:2] == ["<4>careful 1", "<6>[svc] hello from the service"]
        assert lines[3].startswith("<3>a log record of supervisord_llm.test could not be")
    elif fmt == "text":
        assert lines[0].endswith(" WARNING careful 1")
        assert lines[1].endswith(" INFO    [svc] hello from the service")
    else:
        docs = [json.loads(x) for x in lines]
        assert docs[1]["msg"] == "[svc] hello from the service"
        assert docs[1]["logger"] == "supervisord_llm.spawn"
        assert docs[2]["msg"].endswith(LINE_CUT) and docs[3]["level"] == "error"
    if fmt != "json":
        assert lines[2].endswith(LINE_CUT)
    # a second set-up replaces (and closes) the first pipeline
    again = setup_logging(fmt, logging.INFO, out)
    assert pipe.closed and logs.pipeline() is again


class BlockingStream(io.StringIO):
    """A stream without a file descriptor whose writes wait for `gate`."""

    def __init__(self, gate: threading.Event) -> None:
        super().__init__()
        self.gate = gate

    def write(self, s: str) -> int:
        self.gate.wait(60)
        return super().write(s)


def test_service_output_that_would_be_dropped_builds_no_record(root_logging: None) -> None:
    gate = threading.Event()
    out = BlockingStream(gate)
    try:
        pipe = setup_logging("journal", logging.INFO, out, max_bytes=8 * 1024,
                             reserve_bytes=2048)
        records: list[logging.LogRecord] = []

        class Count(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                records.append(record)
                return True

        spawn_log = logging.getLogger("supervisord_llm.spawn")
        spawn_log.addFilter(counter := Count())
        try:
            forward = forward_output(spawn_log)
            for i in range(2000):
                forward("svc", f"line {i}")
        finally:
            spawn_log.removeFilter(counter)
        assert pipe.dropped > 1500
        assert len(records) < 200  # the dropped lines never became records
        logging.getLogger("x").error("still logged")
        gate.set()
        assert pipe.flush(5)
        text = out.getvalue()
        assert "<3>still logged" in text
        assert re.search(r"<4>\d+ log lines dropped: the journal did not keep up", text)
    finally:
        gate.set()


# --- the spawner's forwarding --------------------------------------------------------------------

PIECES = r"""
import os, sys, time
os.write(1, b"hel"); time.sleep(0.05)
os.write(1, b"lo\nwor"); time.sleep(0.05)
os.write(1, b"ld\n" + b"L" * 200000 + b"\nafter the long one\r\n")
os.write(1, b"no newline at the end")
"""


def model_lines(path: Path) -> list[tuple[str, str]]:
    """What keepers wrote (plain format): (service, line)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("["):
            service, _, rest = line[1:].partition("] ")
            out.append((service, rest))
    return out


@pytest.fixture
def output(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A file for the keepers' output (their stderr)."""
    path = tmp_path / "models.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    yield path, fd
    os.close(fd)


async def test_output_lines_are_kept_whole(tmp_path: Path, output: tuple[Path, int]) -> None:
    """The keeper reads the engine's output in pieces and writes it line by line, with the
    service's name; a line too long for one atomic write is cut, the rest of it skipped."""
    path, fd = output
    sp = Spawner(tmp_path, use_guardian=False, output_fd=fd)
    proc = await sp.launch(LaunchSpec("svc", (sys.executable, "-c", PIECES), dict(os.environ)))
    assert await proc.wait() == 0
    proc.release()
    await sp.close()
    got = model_lines(path)
    lines = [line for _, line in got]
    assert lines[:2] == ["hello", "world"]
    assert lines[2] == "L" * 3800 + LINE_CUT  # one cut line, the rest of it skipped
    assert lines[3:] == ["after the long one", "no newline at the end"]
    assert {s for s, _ in got} == {"svc"}


async def test_a_chatty_service_is_read_promptly_and_the_loop_keeps_turning(
        tmp_path: Path, output: tuple[Path, int]) -> None:
    """A service's output never comes through the daemon: its loop is not even touched."""
    path, fd = output
    sp = Spawner(tmp_path, use_guardian=False, output_fd=fd)
    code = "import sys\nwhile True:\n    sys.stdout.write('chatter ' * 8 + '\\n')\n"
    proc = await sp.launch(LaunchSpec("chatty", (sys.executable, "-c", code),
                                      dict(os.environ)))
    try:
        ticks: list[float] = []
        t_end = time.monotonic() + 1.5
        while time.monotonic() < t_end:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)  # a timer: how late it fires is the loop's lag
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(gaps) < 0.2
        assert path.stat().st_size > 10000 * 70  # read and written as it comes
    finally:
        sp.kill_all()
        await proc.wait()
        proc.release()
        await sp.close()


async def test_user_lookups_run_off_the_loop(tmp_path: Path, output: tuple[Path, int]) -> None:
    import pwd

    path, fd = output
    me = pwd.getpwuid(os.geteuid()).pw_name
    sp = Spawner(tmp_path, use_guardian=False, output_fd=fd)
    proc = await sp.launch(LaunchSpec("svc", (sys.executable, "-c",
                                              "import os; print(os.environ['USER'])"),
                                      dict(os.environ), user=me))
    assert await proc.wait() == 0
    proc.release()
    with pytest.raises(SpawnError, match="no such user"):
        await sp.launch(LaunchSpec("svc", ("true",), dict(os.environ),
                                   user="no-such-user-llmsup"))
    await sp.close()
    assert [line for _, line in model_lines(path)] == [me]


# --- sd_notify ----------------------------------------------------------------------------------


def test_notifier_never_blocks_on_a_full_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))  # never read
    try:
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
        assert n.enabled and n.watchdog_interval_s == 0.5
        t0 = time.monotonic()
        for _ in range(2000):
            n.watchdog()
        assert time.monotonic() - t0 < 1
        assert n.sent + n.dropped == 2000
        assert n.sent > 0 and n.dropped > 0 and n.last_error is not None
        n.close()
    finally:
        receiver.close()
    gone = Notifier({"NOTIFY_SOCKET": str(path)})  # nobody bound there any more
    assert not gone.ready("x") and gone.dropped == 1
    gone.close()


# --- the daemon as a real process, its stderr a pipe nobody reads ------------------------------

CHATTY = "import sys\nwhile True:\n    sys.stdout.write('chatter ' * 10 + '\\n')\n"


def chatty_config(tmp: Path) -> dict[str, Any]:
    doc = base_config(tmp, [{
        "name": "chatty", "command": [sys.executable, "-c", CHATTY],
        "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2, "max_restarts": 5,
                    "window_s": 60},
        "stop": {"timeout_s": 2},
    }], gpus=1, metrics=False)
    doc["supervisor"]["log_format"] = "journal"
    return doc


def past(t: float) -> Callable[[], bool]:
    return lambda: time.monotonic() > t


PIPE_FULL = 32 * 1024  # unread bytes in the pipe (64 KiB; a blocked write leaves some free)


def unread(fd: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return int.from_bytes(buf, sys.byteorder)


class PipeReader:
    """Reads the daemon's stderr in a thread, keeping only what it looks for."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.notices: list[int] = []
        self.bytes = 0
        self._tail = b""
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except OSError:
                return
            if not data:
                return
            self.bytes += len(data)
            text = self._tail + data
            # a match that lies wholly in the tail was counted with the previous read
            self.notices += [int(m.group(1)) for m in NOTICE.finditer(text)
                             if m.end() > len(self._tail)]
            self._tail = text[-200:]

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


class Pipe:
    """The daemon's stdout and stderr: an os.pipe() that the test reads, or not."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        self._open = {self.r, self.w}

    def close(self, fd: int) -> None:
        if fd in self._open:  # never twice: the number may be reused by then
            self._open.discard(fd)
            os.close(fd)


@pytest.fixture
def stderr_pipe() -> Iterator[Pipe]:
    pipe = Pipe()
    yield pipe
    pipe.close(pipe.w)
    pipe.close(pipe.r)


def test_a_journal_that_does_not_read_never_stalls_the_daemon(
        tmp_path: Path, notify: NotifyListener, stderr_pipe: Pipe) -> None:
    rfd, wfd = stderr_pipe.r, stderr_pipe.w
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    d = Daemon(tmp_path, chatty_config(tmp_path), env, stdio=wfd)
    reader: PipeReader | None = None
    try:
        d.start()
        stderr_pipe.close(wfd)  # the daemon holds the only write end
        d.wait_state("chatty", "ready")
        chatty = psutil.Process(d.service("chatty")["pid"])
        daemon = psutil.Process(d.proc.pid)  # type: ignore[union-attr]
        wait_until(lambda: unread(rfd) >= PIPE_FULL, 10, what="the pipe full")
        # The journal does not read for 4 s: the daemon keeps answering and pinging, the
        # service keeps writing (its output is read and dropped), memory stays bounded.
        t_start = time.monotonic()
        cpu = [(t_start, sum(chatty.cpu_times()[:2]))]
        rss = [daemon.memory_info().rss]
        answers: list[float] = []
        while time.monotonic() < t_start + 4:
            t0 = time.monotonic()
            assert d.status()["services"][0]["state"] == "ready"
            answers.append(time.monotonic() - t0)
            rss.append(daemon.memory_info().rss)
            cpu.append((time.monotonic(), sum(chatty.cpu_times()[:2])))
            wait_until(past(t0 + 0.1), 1)  # pace the probes
        t_end = time.monotonic()
        assert unread(rfd) >= PIPE_FULL  # nobody read: the pipe stayed full throughout
        assert max(answers) < 1.0, answers
        pings = [t for t in notify.times("WATCHDOG=1") if t_start <= t <= t_end]
        gaps = [b - a for a, b in itertools.pairwise([t_start, *pings, t_end])]
        assert len(pings) >= 8 and max(gaps) < 1.0, gaps
        # it ran, it was never blocked on its output: its CPU time grew in every second (how
        # much depends on what else the machine runs; a writer blocked on a full pipe gets none)
        for t, used in cpu:
            later = [u for t2, u in cpu if t2 >= t + 1.0]
            assert not later or later[0] > used, (t - t_start, cpu)
        assert max(rss) - rss[0] < 16 * 1024 * 1024, rss  # the queue holds 2 MiB at most
        # The journal reads again: the daemon says what it dropped.
        reader = PipeReader(rfd)
        wait_until(lambda: reader is not None and reader.notices, 10,
                   what="the 'log lines dropped' notice")
        assert reader.notices[0] > 1000
    finally:
        if reader is None:
            reader = PipeReader(rfd)  # let it write its last lines and exit
        d.stop()
        reader.join(10)


def test_the_exit_does_not_hang_on_a_stuck_journal(
        tmp_path: Path, stderr_pipe: Pipe) -> None:
    rfd, wfd = stderr_pipe.r, stderr_pipe.w
    d = Daemon(tmp_path, chatty_config(tmp_path), stdio=wfd)
    try:
        d.start()
        stderr_pipe.close(wfd)  # the daemon holds the only write end
        d.wait_state("chatty", "ready")
        wait_until(lambda: unread(rfd) >= PIPE_FULL, 10, what="the pipe full")
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        assert d.wait(15) == 0
        assert time.monotonic() - t0 < 10
    finally:
        d.stop()
