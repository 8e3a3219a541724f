"""lib/cleanup.py: address rewriting, header and body inspection, missing headers."""

from email.message import EmailMessage
import os

import pytest

from postfix_py.lib import cleanup, maincf, msg
from postfix_py.lib import queue as Q

HOST = "mx.test.example"


def make(tmp_path, files=None, **settings):
    """A Settings from main.cf settings (tables written from files), and a queue root."""
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    conf = {"myhostname": HOST, "mydestination": "$myhostname, localhost", **settings}
    text = "".join(f"{k} = {v}\n" for k, v in conf.items())
    (tmp_path / "main.cf").write_text(text.replace("@DIR@", str(tmp_path)))
    root = str(tmp_path / "q")
    for sub in Q.SUBDIRS:
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    return cleanup.Settings(maincf.load(str(tmp_path))), root


def run(settings, root, content, sender="a@example.org", rcpts=("b@example.org",),
        chunk=None, **kw):
    c = cleanup.Cleanup(settings, root, origin="client.example[192.0.2.1]", proto="ESMTP",
                        helo="client.example", **kw)
    c.set_sender(sender)
    for r in rcpts:
        c.add_recipient(r)
    step = chunk or len(content) or 1
    for i in range(0, len(content), step):
        c.write(content[i:i + step])
    result = c.finish()
    sub = {"queued": "incoming", "held": "hold"}.get(result.status)
    if sub is None:
        assert not any(result.queue_id in name for name in
                       os.listdir(os.path.join(root, "incoming")))
        return result, None, None
    path = os.path.join(root, sub, result.queue_id)
    env = Q.read(path)
    return result, env, b"".join(env.content(path))


@pytest.fixture
def logged(monkeypatch):
    lines = []
    monkeypatch.setattr(msg, "_emit", lambda severity, text, tag=None: lines.append(
        ("" if severity == "info" else severity + ": ") + text))
    return lines


def test_plain_message_passes_unchanged_whatever_the_chunking(tmp_path):
    s, root = make(tmp_path)
    content = b"Subject: hi\nTo: b@example.org\n\nbody\n.dot\n"
    for chunk in (None, 1, 3, 7):
        result, env, data = run(s, root, content, chunk=chunk)
        assert result.status == "queued"
        assert data == content
        assert env.sender == "a@example.org"
        assert [r.address for r in env.recipients] == ["b@example.org"]


def test_header_size_limit_drops_the_excess_only(tmp_path):
    s, root = make(tmp_path, header_size_limit="100")
    folded = b"X-Folded: start" + b"".join(b"\n word%02d-" % i + b"x" * 20 for i in range(10))
    content = folded + b"\nX-Long: " + b"y" * 300 + b"\n\nbody\n"
    for chunk in (None, 5):
        _, _, data = run(s, root, content, chunk=chunk)
        assert b"word02" in data and b"word03" not in data
        assert b"X-Long: " + b"y" * 300 + b"\n\nbody\n" in data


def test_hopcount_limit_counts_received_headers(tmp_path, logged):
    s, root = make(tmp_path, hopcount_limit="3")
    result, _, _ = run(s, root, b"Received: a\n" * 2 + b"\nx\n")
    assert result.status == "queued"
    result, _, _ = run(s, root, b"Received: a\n" * 3 + b"\nx\n")
    assert (result.status, result.reply) == ("rejected", "554 5.4.0 Error: too many hops")
    assert any(line.endswith(": message rejected: hopcount exceeded") for line in logged)


def test_receive_override_options(tmp_path):
    # no_address_mappings: no canonical, virtual alias or bcc maps, no always_bcc, no
    # masquerading; header checks and content_filter stay. no_header_body_checks: no
    # checks; the maps and content_filter stay.
    files = {"canon": "a@example.org c@example.org\n", "virt": "b@example.org x@example.net\n",
             "hc": "/^Subject: hit/ PREPEND X-Hit: 1\n"}
    common = dict(canonical_maps="texthash:@DIR@/canon",
                  virtual_alias_maps="texthash:@DIR@/virt", always_bcc="archive@example.org",
                  masquerade_domains="example.org",
                  header_checks="regexp:@DIR@/hc", content_filter="scan:[127.0.0.1]:10025")
    s, root = make(tmp_path, files, receive_override_options="no_address_mappings", **common)
    _, env, data = run(s, root, b"Subject: hit\n\nx\n", sender="a@example.org")
    assert env.sender == "a@example.org"
    assert [r.address for r in env.recipients] == ["b@example.org"]
    assert data == b"X-Hit: 1\nSubject: hit\n\nx\n"
    assert env.attrs["content_filter"] == "scan:[127.0.0.1]:10025"
    assert cleanup.masquerade(s, "u@host.example.org") == "u@host.example.org"
    s, root = make(tmp_path, files, receive_override_options="no_header_body_checks",
                   **common)
    _, env, data = run(s, root, b"Subject: hit\n\nx\n", sender="a@example.org")
    assert env.sender == "c@example.org"
    assert sorted(r.address for r in env.recipients) == ["archive@example.org",
                                                         "x@example.net"]
    assert data == b"Subject: hit\n\nx\n"
    assert env.attrs["content_filter"] == "scan:[127.0.0.1]:10025"
    assert cleanup.masquerade(s, "u@host.example.org") == "u@example.org"
    with pytest.raises(maincf.ConfigError, match='unknown receive_override_options value '
                       '"bogus"'):
        make(tmp_path, receive_override_options="bogus")


def test_space_before_colon_is_removed(tmp_path):
    # Postfix's mime_state normalizes the obsolete "name :" for every header, and
    # header_checks see the normalized form
    s, root = make(tmp_path, {"hc": "/^X-Mark: hit/ PREPEND X-Seen: 1\n"},
                   header_checks="regexp:@DIR@/hc")
    for chunk in (None, 1, 5):
        _, _, data = run(s, root, b"Subject :  hi\nX-Mark\t : hit\n\nSubject : body\n",
                         chunk=chunk)
        assert data == b"Subject:  hi\nX-Seen: 1\nX-Mark: hit\n\nSubject : body\n"


def test_missing_headers_for_local_submission_only(tmp_path, logged):
    s, root = make(tmp_path)
    _, _, data = run(s, root, b"Subject: s\nBcc: secret@example.org\n\nbody\n", local=True,
                     sender="alice", fullname="Alice Example")
    head = data.split(b"\n\n")[0].decode()
    assert "Bcc:" not in head
    assert "\nFrom: Alice Example <alice@mx.test.example>" in head
    assert "\nDate: " in head and "\nMessage-Id: <" in head
    # SMTP: no header added; message_drop_headers (bcc, content-length, resent-bcc,
    # return-path) removes those headers from all mail, as Postfix 3.0 and later
    content = b"Subject: s\nBcc: x@example.org\nReturn-Path: <x>\nContent-Length: 5\n" \
        b"Resent-Bcc: y\nX-Keep: 1\n\nbody\n"
    _, _, data = run(s, root, content)
    assert data == b"Subject: s\nX-Keep: 1\n\nbody\n"
    s, root = make(tmp_path, message_drop_headers="x-keep")
    _, _, data = run(s, root, content)
    assert data == content.replace(b"X-Keep: 1\n", b"")
    s, root = make(tmp_path, always_add_missing_headers="yes")
    _, _, data = run(s, root, b"Resent-From: r@example.org\n\nbody\n")
    assert b"Resent-Message-Id: <" in data and b"Resent-Date: " in data
    assert b"\nFrom:" not in data


def test_header_checks_actions(tmp_path, logged):
    checks = ("/^Subject: reject me/ REJECT no thanks\n/^Subject: defer me/ REJECT 4.7.0 later\n"
              "/^Subject: drop me/ DISCARD dropped\n/^Subject: hold me/ HOLD held\n"
              "/^Subject: redirect me/ REDIRECT other@example.net\n"
              "/^X-Drop:/ IGNORE\n/^X-Old: (.*)/ REPLACE X-New: $1\n"
              "/^X-Mark:/ PREPEND X-Seen: yes\n/^X-Warn:/ WARN careful\n")
    s, root = make(tmp_path, {"hc": checks}, header_checks="regexp:@DIR@/hc")
    result, _, _ = run(s, root, b"Subject: reject me\n\nx\n")
    assert (result.status, result.reply) == ("rejected", "550 5.7.1 no thanks")
    assert f"{result.queue_id}: reject: header Subject: reject me from " \
        "client.example[192.0.2.1]; from=<a@example.org> to=<b@example.org> proto=ESMTP " \
        "helo=<client.example>: 5.7.1 no thanks" in logged
    result, _, _ = run(s, root, b"Subject: defer me\n\nx\n")
    assert (result.status, result.reply) == ("deferred", "451 4.7.0 later")
    result, _, _ = run(s, root, b"Subject: drop me\n\nx\n")
    assert result.status == "discarded"
    assert any(f"{result.queue_id}: discard: header Subject: drop me" in x for x in logged)
    result, env, _ = run(s, root, b"Subject: hold me\n\nx\n")
    assert result.status == "held" and env.sender == "a@example.org"
    result, env, _ = run(s, root, b"Subject: redirect me\n\nx\n", rcpts=["b@x.org", "c@y.org"])
    assert [r.address for r in env.recipients] == ["other@example.net"]
    _, _, data = run(s, root, b"X-Drop: 1\nX-Old: v\nX-Mark: m\nX-Warn: w\n\nx\n")
    assert data == b"X-New: v\nX-Seen: yes\nX-Mark: m\nX-Warn: w\n\nx\n"
    assert any(": warning: header X-Warn: w from " in x and x.endswith(": careful")
               for x in logged)


def test_body_checks_line_by_line(tmp_path, logged):
    s, root = make(tmp_path, {"bc": "/^bad line$/ REJECT\n/^secret/ IGNORE\n"},
                   body_checks="regexp:@DIR@/bc")
    result, _, data = run(s, root, b"Subject: s\n\nok\nsecret stuff\nend\n", chunk=4)
    assert data == b"Subject: s\n\nok\nend\n"
    result, _, _ = run(s, root, b"Subject: s\n\nok\nbad line\n", chunk=3)
    assert result.reply == "550 5.7.1 message content rejected"


def test_virtual_alias_recursion_and_limits(tmp_path, logged):
    virtual = ("a@example.com b@example.com\nb@example.com c@example.com, self@example.com\n"
               "self@example.com self@example.com, copy@example.net\n"
               "@alias.example catchall@example.com\nloop1@example.com loop2@example.com\n"
               "loop2@example.com loop1@example.com\nuser@example.com local\n")
    s, root = make(tmp_path, {"virtual": virtual}, virtual_alias_maps="texthash:@DIR@/virtual",
                   recipient_delimiter="+")
    _, env, _ = run(s, root, b"x\n", rcpts=["a@example.com", "who+ext@alias.example",
                                              "user+box@example.com"])
    assert [r.address for r in env.recipients] == [
        "c@example.com", "self@example.com", "copy@example.net", "catchall@example.com",
        f"local+box@{HOST}"]
    result, _, _ = run(s, root, b"x\n", rcpts=["loop1@example.com"])
    assert (result.status, result.reply) == ("deferred", "451 4.6.0 Alias expansion error")
    assert any("unreasonable virtual_alias_maps map nesting for loop1@example.com" in x
               for x in logged)
    many = "big@example.com " + ", ".join(f"u{i}@example.org" for i in range(5)) + "\n"
    s, root = make(tmp_path, {"v2": many}, virtual_alias_maps="texthash:@DIR@/v2",
                   virtual_alias_expansion_limit="3")
    result, _, _ = run(s, root, b"x\n", rcpts=["big@example.com"])
    assert result.status == "deferred"
    assert any("unreasonable virtual_alias_maps map expansion size" in x for x in logged)


def test_canonical_masquerade_and_bcc(tmp_path):
    s, root = make(tmp_path, {"canon": "alice@old.example alice@new.example\n"
                                       "@legacy.example @modern.example\n",
                              "sbcc": "alice@new.example archive@example.org\n"},
                   canonical_maps="texthash:@DIR@/canon", always_bcc="audit@example.org",
                   sender_bcc_maps="texthash:@DIR@/sbcc",
                   masquerade_domains="!keep.example.com, example.com",
                   masquerade_classes="envelope_sender, envelope_recipient")
    _, env, _ = run(s, root, b"x\n", sender="alice@old.example",
                    rcpts=["bob@legacy.example", "u@host.example.com", "k@keep.example.com"])
    assert env.sender == "alice@new.example"
    assert [r.address for r in env.recipients] == [
        "bob@modern.example", "u@example.com", "k@keep.example.com", "archive@example.org",
        "audit@example.org"]


def test_unknown_address_class_is_refused(tmp_path):
    with pytest.raises(maincf.ConfigError, match="canonical_classes.*header_sendr"):
        make(tmp_path, canonical_classes="envelope_sender, header_sendr")


HEADERS = (b'From: Alice Old <alice@old.example>\nTo: bob@legacy.example, "Carl, C." '
           b'<carl@host.example.com> (work), dave\nCc: team: x@legacy.example;\n'
           b'Reply-To: <alice@old.example>\nSubject: alice@old.example stays\n'
           b'Message-Id: <alice@old.example>\n\nalice@old.example in the body\n')


def header_settings(tmp_path, **settings):
    return make(tmp_path, {"canon": "alice@old.example alice@new.example\n"
                                    "@legacy.example @modern.example\n"},
                canonical_maps="texthash:@DIR@/canon", masquerade_domains="example.com",
                **settings)


def test_header_addresses_rewritten_in_the_local_context(tmp_path):
    # Postfix's default classes: canonical_maps on both header classes, masquerading
    # on both; unqualified addresses get @$myorigin; other headers and the body stay.
    s, root = header_settings(tmp_path)
    _, env, data = run(s, root, HEADERS, header_rewrite="local")
    head, body = data.split(b"\n\n", 1)
    lines = head.decode().split("\n")
    # a header whose addresses changed is generated again and folded, as Postfix's
    assert lines[:-1] == [
        "From: Alice Old <alice@new.example>",
        'To: bob@modern.example, "Carl, C." <carl@example.com>(work),',
        f"\tdave@{HOST}",
        "Cc: team: x@modern.example;",
        "Reply-To: <alice@new.example>",
        "Subject: alice@old.example stays",
        "Message-Id: <alice@old.example>"]
    # the local context adds the missing Date: (Postfix's cleanup_header_done_callback)
    assert lines[-1].startswith("Date: ")
    assert body == b"alice@old.example in the body\n"


def test_header_addresses_in_the_remote_context(tmp_path):
    # remote_header_rewrite_domain empty (the default): no header is touched
    s, root = header_settings(tmp_path)
    _, _, data = run(s, root, HEADERS)
    assert data == HEADERS
    # with a domain: qualification with it, and the maps
    s, root = header_settings(tmp_path, remote_header_rewrite_domain="domain.invalid",
                              canonical_classes="envelope_sender, header_recipient",
                              masquerade_classes="envelope_sender")
    _, _, data = run(s, root, HEADERS)
    head = data.split(b"\n\n", 1)[0].decode().split("\n")
    assert head[0] == "From: Alice Old <alice@old.example>"       # not header_sender
    assert head[1:3] == ['To: bob@modern.example, "Carl, C." <carl@host.example.com>(work),',
                         "\tdave@domain.invalid"]


def test_header_address_token_limit(tmp_path):
    s, root = header_settings(tmp_path, header_address_token_limit="5")
    _, _, data = run(s, root, b"To: a@legacy.example, b@legacy.example\n\nx\n",
                     header_rewrite="local")
    # as Postfix: the tokens past the limit are not in the parse tree, so that the
    # header generated again from it has only the first address
    assert data.startswith(b"To: a@modern.example\nMessage-Id: ")


def test_content_filter_parameter_and_bad_filter(tmp_path, logged):
    s, root = make(tmp_path, {"hc": "/^X-F:/ FILTER nocolon\n"},
                   header_checks="regexp:@DIR@/hc", content_filter="scan:[127.0.0.1]:10024")
    _, env, _ = run(s, root, b"X-F: 1\n\nx\n")
    assert env.attrs["content_filter"] == "scan:[127.0.0.1]:10024"
    assert 'warning: bad FILTER action "nocolon" in header_checks map -- need ' \
           '"transport:destination"' in logged
    _, env, _ = run(s, root, b"x\n", checks=False)            # internal mail
    assert "content_filter" not in env.attrs


def test_filter_and_unknown_actions(tmp_path, logged):
    s, root = make(tmp_path, {"hc": "/^X-F:/ FILTER smtp:[127.0.0.1]:10025\n/^X-U:/ FROB\n"
                                    "/^X-R:/ REDIRECT nobody\n"},
                   header_checks="regexp:@DIR@/hc")
    result, env, data = run(s, root, b"X-F: 1\nX-U: 2\nX-R: 3\n\nx\n")
    assert result.status == "queued" and data == b"X-F: 1\nX-U: 2\nX-R: 3\n\nx\n"
    assert [r.address for r in env.recipients] == ["b@example.org"]
    assert env.attrs["content_filter"] == "smtp:[127.0.0.1]:10025"
    assert any("filter: header X-F: 1 from client.example[192.0.2.1];" in x and
               x.endswith(": smtp:[127.0.0.1]:10025") for x in logged)
    assert "warning: unknown command in header_checks map: FROB" in logged
    assert any('bad REDIRECT target "nobody" in header_checks map' in x for x in logged)


def test_endless_header_line_and_headers_only_message(tmp_path):
    s, root = make(tmp_path, header_size_limit="100")
    # taken in pieces of line_length_limit (2048), as Postfix: the first is kept whole
    for chunk in (None, 1000, 5000):
        _, _, data = run(s, root, b"X-Big: " + b"z" * 10000 + b"\n\nbody\n", chunk=chunk)
        assert data == b"X-Big: " + b"z" * (2048 - 7) + b"\n\nbody\n"
    _, _, data = run(s, root, b"not a header " + b"z" * 5000 + b"\nmore\n", chunk=1000)
    assert data == b"not a header " + b"z" * 5000 + b"\nmore\n"       # all body
    _, _, data = run(s, root, b"Subject: only headers")
    assert data == b"Subject: only headers\n"


MIME = (b'Subject: outer\nMIME-Version: 1.0\nContent-Type: multipart/mixed;\n'
        b'\tboundary="b1"\n\npreamble\n--b1\nContent-Type: text/plain\n\n'
        b'Subject: not a header here\n--b1\nContent-Type: message/rfc822\n'
        b'Content-Disposition: attachment\n\nSubject: inner secret\nX-Tag: inner\n'
        b'Content-Type: multipart/alternative; boundary=b2\n\n--b2\nX-Part: deep\n\n'
        b'deep text\n--b2--\n--b1\nContent-Type: application/x-evil; name="a.exe"\n\n'
        b'data\n--b1--\nepilogue\n')


def test_mime_and_nested_header_checks(tmp_path, logged):
    # defaults: both are $header_checks; a nested Subject is a nested header
    s, root = make(tmp_path, {"hc": "/^Subject: inner secret/ REJECT nested subject\n"
                                    "/^Subject: not a header/ REJECT body text\n"},
                   header_checks="regexp:@DIR@/hc")
    result, _, _ = run(s, root, MIME, chunk=7)
    assert (result.status, result.reply) == ("rejected", "550 5.7.1 nested subject")
    assert any("reject: header Subject: inner secret from client.example[192.0.2.1];"
               in x for x in logged)
    # mime_header_checks alone: the part headers, and MIME headers at any level
    s, root = make(tmp_path, {"mh": '/^Content-Type:.*name="?[^"]*\\.exe/ REJECT no exe\n'},
                   mime_header_checks="regexp:@DIR@/mh")
    result, _, _ = run(s, root, MIME)
    assert (result.status, result.reply) == ("rejected", "550 5.7.1 no exe")
    # header_checks does not see part or nested headers when the other two are empty;
    # IGNORE drops a header at each level, and the body is kept as it was otherwise
    s, root = make(tmp_path, {"hc": "/^Subject: inner/ REJECT nope\n/^X-Tag:/ IGNORE\n",
                              "nh": "/^X-Tag:/ IGNORE\n", "mh": "/^X-Part:/ IGNORE\n"},
                   header_checks="regexp:@DIR@/hc", nested_header_checks="regexp:@DIR@/nh",
                   mime_header_checks="regexp:@DIR@/mh")
    result, _, data = run(s, root, MIME, chunk=5)
    assert result.status == "queued"
    assert data == MIME.replace(b"X-Tag: inner\n", b"").replace(b"X-Part: deep\n", b"")
    s, root = make(tmp_path, {"hc": "/^Subject: inner/ REJECT nope\n"},
                   header_checks="regexp:@DIR@/hc", nested_header_checks="",
                   mime_header_checks="")
    result, _, data = run(s, root, MIME)
    assert result.status == "queued" and data == MIME


def test_body_checks_see_body_text_only(tmp_path, logged):
    # Postfix's mime_state.c: part headers and attached message headers are not body
    # text; body_checks see the text, boundary lines and the epilogue, even with
    # header_checks, mime_header_checks and nested_header_checks all empty.
    s, root = make(tmp_path, {"bc": "/./ WARN\n"}, body_checks="regexp:@DIR@/bc")
    result, _, data = run(s, root, MIME, chunk=11)
    assert result.status == "queued" and data == MIME
    seen = [x.split(": warning: body ", 1)[1].split(" from client.example")[0]
            for x in logged if ": warning: body " in x]
    assert seen == ["preamble", "--b1", "Subject: not a header here", "--b1", "--b2",
                    "deep text", "--b2--", "--b1", "data", "--b1--", "epilogue"]


def test_body_checks_on_a_real_multipart_message(tmp_path):
    # a message built by Python's email package: a text part, an attachment, and an
    # attached message; body_checks match neither the part nor the nested headers
    inner = EmailMessage()
    inner["Subject"] = "forwarded"
    inner.set_content("inner text\n")
    outer = EmailMessage()
    outer["Subject"] = "outer"
    outer.set_content("hello\n")
    outer.add_attachment(b"MZ", maintype="application", subtype="octet-stream",
                         filename="a.exe")
    outer.add_attachment(inner)
    raw = outer.as_bytes().replace(b"\r\n", b"\n")
    s, root = make(tmp_path, {"bc": "/^Content-/ REJECT part header\n"
                                    "/^Subject: forwarded/ REJECT nested header\n"},
                   body_checks="regexp:@DIR@/bc")
    result, _, data = run(s, root, raw)
    assert result.status == "queued" and data == raw
    s, root = make(tmp_path, {"bc": "/^inner text/ REJECT nested body\n"},
                   body_checks="regexp:@DIR@/bc")
    result, _, _ = run(s, root, raw)
    assert (result.status, result.reply) == ("rejected", "550 5.7.1 nested body")


def test_missing_headers_by_rewrite_context(tmp_path, logged):
    # Postfix's cleanup_header_done_callback: added with a header rewrite context (local,
    # or remote with remote_header_rewrite_domain) or always_add_missing_headers; the
    # headers present are recognised whatever else the message has (no header_checks).
    mail = b"X-A: 1\ndate: Thu, 1 Jan 2026 00:00:00 +0000\nSubject: s\n\nbody\n"
    s, root = make(tmp_path)
    result, _, data = run(s, root, mail)                  # remote, no domain: nothing
    assert data == mail
    assert f"{result.queue_id}: message-id=<>" in logged
    for settings, kw in (({}, {"header_rewrite": "local"}),
                         ({"remote_header_rewrite_domain": "d.example"}, {}),
                         ({"always_add_missing_headers": "yes"}, {})):
        s, root = make(tmp_path, **settings)
        result, _, data = run(s, root, mail, **kw)
        head, body = data.split(b"\n\n", 1)
        added = head.split(b"\n")[3:]
        assert [h.split(b":")[0] for h in added] == [b"Message-Id", b"From"], settings
        assert added[1] == b"From: a@example.org" and body == b"body\n"
        mid = added[0].split(b": ", 1)[1].decode()
        assert mid == f"<{mid[1:15]}.{result.queue_id}@{HOST}>"
        assert f"{result.queue_id}: message-id={mid}" in logged
    # Resent- headers: the Resent- forms; From: is there, Message-Id: is not
    s, root = make(tmp_path)
    result, _, data = run(s, root, b"From: x@example.org\nResent-From: y@example.org\n\nb\n",
                          header_rewrite="local")
    head = data.split(b"\n\n", 1)[0].split(b"\n")
    assert [h.split(b":")[0] for h in head[2:]] == [b"Resent-Message-Id", b"Resent-Date"]
    assert f"{result.queue_id}: message-id=<>" in logged
