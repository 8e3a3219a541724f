"""A TLSRPT report sent by mail is DKIM-signed (RFC 8460 section 3) by the MTA's signing
milter, as with Postfix's TLSRPT reporter, which mails through sendmail.

`postfix-py tlsrpt send` submits a mailto: report through the pickup service, so it
passes non_smtpd_milters like any local submission: here Debian's OpenDKIM in signing
mode for example.org (the domain of tlsrpt_sender). The report is delivered by local
into a maildir, and dkimpy verifies its signature with the test key's public half. The
outcomes are written into tlsrpt_database with lib/tlsrpt.py's Store, as the smtp
client records them; dnsmasq serves the domain's `_smtp._tls` record.
"""

import email
import glob
import gzip
import json
import os
from pathlib import Path

import pytest

from peers import DNSMASQ, Dnsmasq
from pfxinst import Instance, wait_for
from postfix_py.lib import tlsrpt
from test_milter_interop import (GENKEY, MILTER_GRACE, OPENDKIM, dkim,  # noqa: F401
                                 keys, start_opendkim, stop)

pytestmark = [pytest.mark.interop, pytest.mark.skipif(
    not (OPENDKIM and GENKEY and dkim and DNSMASQ and os.geteuid() == 0),
    reason="needs Debian's opendkim, opendkim-tools, dkimpy, dnsmasq and root")]


@pytest.fixture(scope="module")
def signer(keys):
    d, _ = keys
    proc, port, log = start_opendkim(d, "tlsrpt-signer", [
        "Mode s", "Domain example.org", "Selector test", f"KeyFile {d / 'test.private'}"])
    yield port
    stop(proc, log, MILTER_GRACE)


@pytest.fixture(scope="module")
def mta(tmp_path_factory, signer):
    root = Path(tmp_path_factory.mktemp("tlsrptdkim"))
    for p in [root, *root.parents]:
        if str(p) in ("/", "/tmp"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o755)
    dnsd = Dnsmasq(["--txt-record=_smtp._tls.dkim.test,v=TLSRPTv1; rua=mailto:nobody@localhost"],
                   root / "dnsmasq.log",
                   ready=lambda r: r.resolve("_smtp._tls.dkim.test", "TXT"))
    inst = Instance.make(root / "pfx")
    inst.spool = inst.add_mail_spool(maildir=True)
    inst.main.update({
        "inet_protocols": "ipv4", "mydestination": "$myhostname, localhost",
        "smtp_dns_nameservers": f"127.0.0.1:{dnsd.port}", "smtp_dns_timeout": "2s",
        "tlsrpt_database": str(root / "tlsrpt.lmdb"),
        "tlsrpt_organization_name": "mail.example.org",
        "tlsrpt_sender": "tlsrpt@example.org",
        "non_smtpd_milters": f"inet:127.0.0.1:{signer}",
    })
    inst.master_lines = ["pickup unix n - y - - pickup", "qmgr unix n - n 300 1 qmgr",
                         "local unix - n n - - local"]
    try:
        inst.start()
        wait_for(lambda: (inst.queue / "public" / "pickup").exists(), 10, what="public/pickup")
        yield inst
    finally:
        inst.cleanup()
        dnsd.close()


def test_mailed_report_is_dkim_signed(mta, keys):
    _, txt = keys
    store = tlsrpt.Store(mta.main["tlsrpt_database"])
    try:
        policy = tlsrpt.policy_dict("tlsa", "dkim.test")
        store.record("dkim.test", policy)
        store.record("dkim.test", policy, tlsrpt.VALIDATION_FAILURE, "127.0.0.1",
                     "mx.dkim.test", "127.0.0.2")
    finally:
        store.close()
    out = mta.cmd("tlsrpt", "send", "-a")
    assert out.returncode == 0, out.stderr
    assert "reports sent: 1, failed: 0" in out.stderr, out.stderr
    files = wait_for(lambda: glob.glob(str(mta.spool / "nobody" / "new" / "*")), 30,
                     what="the mailed report")
    raw = Path(files[0]).read_bytes()
    m = email.message_from_bytes(raw)
    assert m["TLS-Report-Domain"] == "dkim.test"
    assert m["From"] == "tlsrpt@example.org"
    signature = m["DKIM-Signature"]
    assert signature is not None, raw.decode(errors="replace")
    tags = {k.strip(): v.strip() for k, _, v in
            (part.partition("=") for part in "".join(signature.split()).split(";"))}
    assert (tags["d"], tags["s"]) == ("example.org", "test")
    assert "from" in tags["h"].lower().split(":")
    assert "l" not in tags                  # RFC 8460: the whole body is signed
    # The signature verifies over the delivered message (local added Return-Path and
    # Delivered-To above it, outside the signature), CRLF as on the wire, as an RFC 8460
    # receiver checks it: a key record with the service type s=tlsrpt.
    record = txt.replace("p=", "s=tlsrpt; p=", 1).encode()
    wire = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert dkim.verify(wire, tlsrpt="strict", dnsfunc=lambda name, timeout=5: record
                       if name == b"test._domainkey.example.org." else None)
    assert m["TLS-Required"] == "No"
    # ... and only the signed message: a changed report fails it.
    part = [p for p in m.walk() if p.get_content_type() == "application/tlsrpt+gzip"][0]
    rep = json.loads(gzip.decompress(part.get_payload(decode=True)))
    assert rep["policies"][0]["summary"] == {"total-successful-session-count": 1,
                                             "total-failure-session-count": 1}
    tampered = wire.replace(b"This is an aggregate TLS report", b"This is an aggregate TLS rep0rt")
    assert tampered != wire
    assert not dkim.verify(tampered, tlsrpt="strict", dnsfunc=lambda name, timeout=5: record)
