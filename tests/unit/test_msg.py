"""Log lines in Postfix's format: to standard error, to maillog_file, and to syslog."""

import os
import re
import socket

import pytest

from postfix_py.lib import msg

STAMP = r"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d"


@pytest.fixture(autouse=True)
def reset():
    yield
    msg.close()
    msg.init_cli("postfix-py")


def test_cli_lines_on_stderr(capsys):
    msg.init_cli("postconf")
    msg.warn("foo: unknown parameter")
    msg.error("something broke")
    msg.info("plain")
    assert capsys.readouterr().err.splitlines() == [
        "postconf: warning: foo: unknown parameter",
        "postconf: error: something broke",
        "postconf: plain",
    ]


def test_fatal_and_panic_exit_codes(capsys):
    msg.init_cli("postmap")
    with pytest.raises(SystemExit) as exc:
        msg.fatal("open /x: No such file or directory")
    assert exc.value.code == 1
    with pytest.raises(SystemExit) as exc:
        msg.panic("queue file size mismatch")
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "postmap: fatal: open /x: No such file or directory",
        "postmap: panic: queue file size mismatch",
    ]


def test_maillog_file_format(tmp_path):
    log = tmp_path / "maillog"
    msg.init("smtpd", syslog_name="postfix-py", maillog_file=str(log))
    msg.info("connect from localhost[127.0.0.1]")
    msg.warn("peer said\r\nsomething")   # peer text never splits a record
    lines = log.read_text().splitlines()
    host = socket.gethostname().split(".")[0]
    pid = os.getpid()
    assert re.fullmatch(rf"{STAMP} {re.escape(host)} postfix-py/smtpd\[{pid}\]: "
                        r"connect from localhost\[127\.0\.0\.1\]", lines[0]), lines[0]
    assert lines[1].endswith(f"postfix-py/smtpd[{pid}]: warning: peer said\\r\\nsomething")
    assert len(lines) == 2


@pytest.mark.parametrize("syslog_name", ["postfix", "postfix/submission"])
def test_info_as_another_service(tmp_path, syslog_name):
    log = tmp_path / "maillog"
    msg.init("smtpd", syslog_name=syslog_name, maillog_file=str(log))
    msg.info_as("cleanup", "4Xy: message-id=<a@b>")
    msg.info("disconnect from x[192.0.2.1]")       # the daemon's own tag stays
    pid = os.getpid()
    assert [line.split(None, 4)[4] for line in log.read_text().splitlines()] == [
        f"postfix/cleanup[{pid}]: 4Xy: message-id=<a@b>",
        f"{syslog_name}/smtpd[{pid}]: disconnect from x[192.0.2.1]"]
    assert msg.base_name("postfix-py") == "postfix-py" and msg.base_name("") == "postfix-py"


def test_syslog_datagrams(tmp_path, monkeypatch):
    path = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    try:
        monkeypatch.setattr(msg, "SYSLOG_PATH", path)
        msg.init("tlsmgr", syslog_name="pfx", syslog_facility="local3")
        msg.warn("cannot open exchange file")
        record = server.recv(4096).decode()
    finally:
        server.close()
    # priority = facility local3 (19) * 8 + warning (4)
    assert re.fullmatch(rf"<156>{STAMP} pfx/tlsmgr\[{os.getpid()}\]: warning: "
                        r"cannot open exchange file", record), record


def test_verbose_levels(capsys):
    msg.init_cli("postconf", verbose=1)
    msg.verbose(1, "shown")
    msg.verbose(2, "hidden")
    assert capsys.readouterr().err == "postconf: shown\n"


def test_unknown_facility():
    with pytest.raises(ValueError, match="unknown syslog_facility"):
        msg.init("smtpd", syslog_facility="nosuch")


def test_printable_ascii_and_limit():
    assert msg.printable("plain text") == "plain text"
    assert msg.printable("a\tb\r\nc\x00\x7f") == "a?b??c??"
    assert msg.printable("x" * 150) == "x" * 100
    assert msg.printable("abcdef", 3) == "abc"
    assert msg.printable("y" * 150, None) == "y" * 150
    assert msg.printable(b"bytes\x1b[31m", 20) == "bytes?[31m"


def test_printable_utf8():
    # Valid UTF-8 stays, as with Postfix's smtputf8_enable = yes; bad bytes become `?`
    # one each; C1 controls, separators and non-breaking space are not printable.
    assert msg.printable("grüße ☃".encode()) == "grüße ☃"
    assert msg.printable(b"a\xc3(b\xff") == "a?(b?"
    assert msg.printable("a\x85b\u2028c\xa0d") == "a?b?c?d"
    assert msg.printable("grüße".encode(), 4) == "grüß"
    # Without UTF-8 every non-ASCII character is replaced; bytes count one each.
    assert msg.printable("grüße", utf8=False) == "gr??e"
    assert msg.printable("grüße".encode(), 4, utf8=False) == "gr??"


def test_pid_is_the_forked_childs(tmp_path):
    """msg.pid() is kept without a system call, and a forked child gets its own: the
    master forks every worker, whose log lines and status reports must name the worker."""
    assert msg.pid() == os.getpid()
    log = tmp_path / "maillog"
    r, w = os.pipe()
    child = os.fork()
    if child == 0:      # pragma: no cover - the child reports through the pipe
        try:
            msg.init("smtpd", maillog_file=str(log))
            msg.info("child")
            os.write(w, f"{msg.pid()} {os.getpid()}".encode())
        finally:
            os._exit(0)
    os.close(w)
    reported = os.read(r, 100).decode().split()
    os.close(r)
    os.waitpid(child, 0)
    assert reported == [str(child), str(child)]
    assert f"postfix-py/smtpd[{child}]: child" in log.read_text()
    assert msg.pid() == os.getpid() != child


def test_timestamp_is_strftimes_for_each_second(monkeypatch):
    """The time stamp is formatted once per second, and is strftime's for that second."""
    import time
    for now in (1700000000.2, 1700000000.9, 1700000001.0, 1700086400.5, 1700000000.1):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        assert msg._timestamp() == time.strftime("%b %e %H:%M:%S", time.localtime(int(now)))
