"""lib/policy_client.py and smtpd/check.py's check_policy_service against a policy server
in a thread of the test: the wire format, connection reuse and its limits, retries and
Postfix's warnings, malformed answers, and the action applied as an access(5) result."""

import socket
import time

import pytest

from postfix_py.lib import maincf, msg
from postfix_py.lib.policy_client import PolicyClient, parse_endpoint
from postfix_py.smtpd.check import Checker, ClientState, DeferIfPermit, Reply
from policyserver import PolicyServer


@pytest.fixture
def warnings(capsys):
    msg.init_cli("smtpd")
    yield lambda: [line for line in capsys.readouterr().err.splitlines() if "warning" in line]


def test_endpoints():
    assert parse_endpoint("inet:127.0.0.1:10023") == (socket.AF_INET, ("127.0.0.1", 10023),
                                                      "127.0.0.1:10023")
    assert parse_endpoint("inet:[::1]:9")[:2] == (socket.AF_INET6, ("::1", 9))
    assert parse_endpoint("unix:private/policy") == (socket.AF_UNIX, "private/policy",
                                                     "private/policy")
    for bad in ("inet:127.0.0.1", "tcp:x:1", "inet:host:99999", "private/policy", "unix:"):
        with pytest.raises(ValueError):
            parse_endpoint(bad)


def test_request_and_connection_reuse():
    server = PolicyServer(lambda a: [f"action=DUNNO {a['n']}"])
    try:
        client = PolicyClient(server.endpoint)
        assert client.request([("request", "smtpd_access_policy"), ("n", 1)]) == "DUNNO 1"
        assert client.request([("n", "two\nlines")]) == "DUNNO two lines"
        assert server.connections == 1
        assert server.requests[0] == {"request": "smtpd_access_policy", "n": "1"}
        client.close()
    finally:
        server.close()


def test_request_limit_idle_and_ttl_reconnect():
    server = PolicyServer(lambda a: ["action=OK"])
    try:
        client = PolicyClient(server.endpoint, request_limit=2)
        for _ in range(5):
            assert client.request([("x", 1)]) == "OK"
        assert server.connections == 3          # 2 + 2 + 1
        idle = PolicyClient(server.endpoint, max_idle=1)
        idle.request([("x", 1)])
        idle.used -= 1.5                        # as if idle past max_idle
        idle.request([("x", 1)])
        assert server.connections == 5
        ttl = PolicyClient(server.endpoint, max_ttl=1)
        ttl.request([("x", 1)])
        ttl.opened -= 1.5
        ttl.request([("x", 1)])
        assert server.connections == 7
        for c in (client, idle, ttl):
            c.close()
    finally:
        server.close()


def test_server_that_hung_up_is_asked_again_quietly(warnings):
    answers = iter([None, ["action=REJECT no"]])
    server = PolicyServer(lambda a: next(answers))
    try:
        client = PolicyClient(server.endpoint, try_delay=0)
        assert client.request([("x", 1)]) == "REJECT no"
        assert server.connections == 2
        assert warnings() == []      # EOF, then a new connection: not worth a warning
        client.close()
    finally:
        server.close()


def test_refused_connection_warns_and_gives_up(warnings):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                       # nobody listens there now
    client = PolicyClient(f"inet:127.0.0.1:{port}", try_limit=2, try_delay=0)
    assert client.request([("x", 1)]) is None
    lines = [line.split(": ", 1)[1] for line in warnings()]
    assert lines == [f"warning: connect to 127.0.0.1:{port}: Connection refused",
                     f"warning: problem talking to server 127.0.0.1:{port}: "
                     "Connection refused"] * 2


def test_missing_unix_socket_warns_at_the_last_try(tmp_path, warnings):
    path = tmp_path / "nothing"
    client = PolicyClient(f"unix:{path}", try_limit=3, try_delay=0)
    start = time.monotonic()
    assert client.request([("x", 1)]) is None
    assert time.monotonic() - start < 2
    lines = [line.split(": ", 1)[1] for line in warnings()]
    # ENOENT is quiet but at the last try, as attr_clnt_request
    assert lines == [f"warning: connect to {path}: No such file or directory"] * 3 + \
        [f"warning: problem talking to server {path}: No such file or directory"]


@pytest.mark.parametrize("answer, warning", [
    (["result=OK"], "unexpected attribute result from {} (expecting: action)"),
    (["action"], "missing value for string attribute action from {}"),
    ([], "missing attribute action in input from {}"),
])
def test_malformed_answers(answer, warning, warnings):
    server = PolicyServer(lambda a: answer)
    try:
        client = PolicyClient(server.endpoint, try_limit=1)
        assert client.request([("x", 1)]) is None
        name = server.endpoint[5:]
        lines = [line.split(": ", 1)[1] for line in warnings()]
        assert lines == ["warning: " + warning.format(name),
                         f"warning: problem talking to server {name}: Success"]
    finally:
        server.close()


def test_unix_socket_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)        # smtpd works in queue_directory (or its jail root)
    (tmp_path / "private").mkdir()
    server = PolicyServer(lambda a: ["action=OK"], socket.AF_UNIX, "private/policy")
    try:
        client = PolicyClient("unix:private/policy")
        assert client.request([("x", 1)]) == "OK"
        client.close()
    finally:
        server.close()


def test_timeout(warnings):
    server = PolicyServer(lambda a: time.sleep(3) or ["action=OK"])
    try:
        client = PolicyClient(server.endpoint, timeout=1, try_limit=1)
        assert client.request([("x", 1)]) is None
        assert warnings()[-1].endswith(f"problem talking to server {server.endpoint[5:]}: "
                                       "Connection timed out")
    finally:
        server.close()


# --- the restriction -------------------------------------------------------------------
@pytest.fixture(autouse=True)
def close_checkers():
    """Each Checker's policy connections, closed after the test (as smtpd's exit does)."""
    made.clear()
    yield
    for c in made:
        for client in c._policy.values():
            client.close()


made: list[Checker] = []


def checker(endpoint, **values) -> Checker:
    base = {"myhostname": "mail.test.example", "mydestination": "localhost",
            "mynetworks": "127.0.0.0/8", "local_recipient_maps": "",
            "smtpd_recipient_restrictions": f"check_policy_service {endpoint}, "
                                            "reject_unauth_destination",
            "smtpd_relay_restrictions": "",
            "smtpd_policy_service_retry_delay": "1s"}
    base.update(values)
    made.append(Checker(maincf.Config("/nonexistent", "/nonexistent/main.cf",
                                      overrides=base)))
    return made[-1]


def state(**kw) -> ClientState:
    s = ClientState(name="client.example", addr="192.0.2.1", helo="helo.example",
                    sender="s@example.org", reverse_name="client.example", **kw)
    s.session_attrs = lambda: {"protocol_state": "RCPT", "protocol_name": "ESMTP",
                               "client_port": "40000", "server_address": "127.0.0.1",
                               "server_port": "25", "queue_id": "ABC123", "size": 1234,
                               "instance": "1a.2b.3c.0", "recipient_count": 2}
    return s


def test_attributes_as_postfix_sends_them():
    server = PolicyServer(lambda a: ["action=DUNNO"])
    try:
        c = checker(server.endpoint, smtpd_policy_service_policy_context="ctx",
                    smtpd_data_restrictions=f"check_policy_service {server.endpoint}")
        assert c.rcpt(state(sasl_username="alice"), "u@localhost") is None
        sent = server.requests[0]
        assert list(sent) == [
            "request", "protocol_state", "protocol_name", "client_address", "client_name",
            "client_port", "reverse_client_name", "server_address", "server_port",
            "helo_name", "sender", "recipient", "recipient_count", "queue_id", "instance",
            "size", "etrn_domain", "stress", "sasl_method", "sasl_username", "sasl_sender",
            "ccert_subject", "ccert_issuer", "ccert_fingerprint", "ccert_pubkey_fingerprint",
            "encryption_protocol", "encryption_cipher", "encryption_keysize",
            "policy_context", "compatibility_level", "mail_version"]
        assert sent["request"] == "smtpd_access_policy"
        assert sent["protocol_state"] == "RCPT" and sent["protocol_name"] == "ESMTP"
        assert (sent["client_address"], sent["client_name"], sent["client_port"]) == \
            ("192.0.2.1", "client.example", "40000")
        assert (sent["sender"], sent["recipient"], sent["helo_name"]) == \
            ("s@example.org", "u@localhost", "helo.example")
        assert sent["recipient_count"] == "0"      # only at DATA and END-OF-MESSAGE
        assert (sent["queue_id"], sent["size"], sent["sasl_username"]) == \
            ("ABC123", "1234", "alice")
        assert sent["policy_context"] == "ctx" and sent["encryption_keysize"] == "0"
        assert c.data(state(), None) is None
        assert server.requests[1]["protocol_state"] == "DATA"
        assert server.requests[1]["recipient_count"] == "2"
    finally:
        server.close()


@pytest.mark.parametrize("action, result", [
    ("OK", None), ("DUNNO", "relay"),
    ("REJECT go away", "554 5.7.1 <x@elsewhere.example>: Recipient address rejected: go away"),
    ("450 4.2.0 later", "450 4.2.0 <x@elsewhere.example>: Recipient address rejected: later"),
    ("550 nope", "550 5.7.1 <x@elsewhere.example>: Recipient address rejected: nope"),
    ("DEFER_IF_PERMIT 4.2.0 Greylisted", "relay"),     # a later reject wins
])
def test_actions_apply_as_access_results(action, result):
    server = PolicyServer(lambda a: [f"action={action}"])
    try:
        reply = checker(server.endpoint).rcpt(state(), "x@elsewhere.example")
        if result == "relay":
            assert str(reply).endswith("Relay access denied")
        else:
            assert (str(reply) if reply else None) == result
    finally:
        server.close()


def test_defer_if_permit_is_a_deferral():
    server = PolicyServer(lambda a: ["action=DEFER_IF_PERMIT wait"])
    try:
        c = checker(server.endpoint)
        verdict = c._apply("check_policy_service", c._policy[server.endpoint],
                           "smtpd_recipient_restrictions", state(), "u@localhost")
        assert isinstance(verdict, DeferIfPermit)
        assert verdict.reply == Reply(450, "4.7.1", "<u@localhost>: Recipient address "
                                                    "rejected: wait")
        assert str(c.rcpt(state(), "u@localhost")) == \
            "450 4.7.1 <u@localhost>: Recipient address rejected: wait"
    finally:
        server.close()


def test_default_action_when_the_server_is_down(warnings):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    endpoint = f"inet:127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    c = checker(endpoint, smtpd_policy_service_try_limit="1")
    assert str(c.rcpt(state(), "u@localhost")) == \
        "451 4.3.5 <u@localhost>: Recipient address rejected: Server configuration problem"
    c = checker(endpoint, smtpd_policy_service_try_limit="1",
                smtpd_policy_service_default_action="DUNNO")
    assert c.rcpt(state(), "u@localhost") is None
    assert len(warnings()) == 4


def test_endpoint_must_be_given():
    with pytest.raises(maincf.ConfigError):
        checker("")
    with pytest.raises(maincf.ConfigError):
        checker("tcp:127.0.0.1:1")


def test_prepend_collects_headers_before_end_of_data_only(warnings):
    answers = {"RCPT": "PREPEND X-Seen: yes", "DATA": "PREPEND not a header",
               "END-OF-MESSAGE": "PREPEND X-Late: no"}
    server = PolicyServer(lambda a: [f"action={answers[a['protocol_state']]}"])
    try:
        policy = f"check_policy_service {server.endpoint}"
        c = checker(server.endpoint, smtpd_data_restrictions=policy,
                    smtpd_end_of_data_restrictions=policy)
        s = state()
        assert c.rcpt(s, "u@localhost") is None
        assert c.data(s, "u@localhost") is None
        assert c.end_of_data(s, "u@localhost") is None
        assert s.prepend == ["X-Seen: yes"]
        assert [line.split(": ", 1)[1] for line in warnings()] == [
            'warning: access table: entry "PREPEND not a header" requires header: text',
            "warning: access table: action PREPEND must be used before "
            "smtpd_end_of_data_restrictions"]
    finally:
        server.close()
