"""lib/tlsrpt.py's pure parts: result classification, the store's counters, the RFC 8460
report and its mail form, and the `_smtp._tls` record."""

import email
import gzip
import json
from types import SimpleNamespace

from postfix_py.lib import tlsrpt


def info(err=0, matched=True):
    return SimpleNamespace(verify_error=err, peer_matched=matched)


def test_classify():
    c = tlsrpt.classify
    assert c(False, False, None, False, True) == "starttls-not-supported"
    assert c(True, False, None, False, True) == "validation-failure"
    assert c(True, True, info(), True, True) == ""
    assert c(True, True, info(10), False, True) == "certificate-expired"
    # Postfix's tls_log_verify_error() and smtp_proto.c
    assert c(True, True, info(27), False, True) == "certificate-not-trusted"
    assert c(True, True, info(19), False, True) == "validation-failure"
    assert c(True, True, info(20), False, True) == "validation-failure"
    assert c(True, True, info(62), False, True) == "certificate-host-mismatch"
    assert c(True, True, info(0), False, True) == "certificate-host-mismatch"
    assert c(True, True, info(65), False, True) == "certificate-not-trusted"   # DANE
    assert c(True, True, info(7), False, True) == "certificate-not-trusted"
    # opportunistic TLS without a policy: TLS is the success
    assert c(True, True, info(19), False, False) == ""


def test_tlsa_policy_object():
    p = tlsrpt.policy_dict("tlsa", "mx.example.com", "3 1 1 AB12\n2 0 1 CD34")
    assert p == {"policy-type": "tlsa", "policy-domain": "mx.example.com",
                 "policy-string": ["3 1 1 AB12", "2 0 1 CD34"]}


def test_store_counts_and_report(tmp_path):
    store = tlsrpt.Store(str(tmp_path / "tlsrpt"))
    sts = tlsrpt.policy_dict("sts", "example.com", "version: STSv1\r\nmode: enforce\r\n",
                             ["mx.example.com"])
    none = tlsrpt.policy_dict("no-policy-found", "example.com")
    for _ in range(3):
        store.record("Example.COM.", sts, day="2026-12-04")
    store.record("example.com", sts, "certificate-host-mismatch", "127.0.0.1",
                 "mx.example.com", "127.0.0.2", day="2026-12-04")
    store.record("example.com", sts, "certificate-host-mismatch", "127.0.0.1",
                 "mx.example.com", "127.0.0.2", day="2026-12-04")
    store.record("example.com", none, day="2026-12-04")
    store.record("example.com", none, day="2026-12-05")
    days = store.days()
    assert sorted(days) == [("2026-12-04", "example.com"), ("2026-12-05", "example.com")]
    rep = tlsrpt.report("2026-12-04", "example.com", days[("2026-12-04", "example.com")],
                        "sender.example", "postmaster@sender.example", "r1")
    assert rep["date-range"] == {"start-datetime": "2026-12-04T00:00:00Z",
                                 "end-datetime": "2026-12-04T23:59:59Z"}
    by_type = {p["policy"]["policy-type"]: p for p in rep["policies"]}
    assert by_type["sts"]["policy"]["policy-string"] == ["version: STSv1", "mode: enforce"]
    assert by_type["sts"]["summary"] == {"total-successful-session-count": 3,
                                         "total-failure-session-count": 2}
    assert by_type["sts"]["failure-details"] == [{
        "result-type": "certificate-host-mismatch", "sending-mta-ip": "127.0.0.1",
        "receiving-mx-hostname": "mx.example.com", "receiving-ip": "127.0.0.2",
        "failed-session-count": 2}]
    assert by_type["no-policy-found"]["summary"]["total-successful-session-count"] == 1
    store.delete("2026-12-04", "example.com")
    assert sorted(store.days()) == [("2026-12-05", "example.com")]
    store.close()


def test_rua_record():
    assert tlsrpt.parse_txt(["v=TLSRPTv1; rua=mailto:r@example.com,https://r.example/x"]) \
        == ["mailto:r@example.com", "https://r.example/x"]
    assert tlsrpt.parse_txt(["v=TLSRPTv1;rua=ftp://x"]) is None
    assert tlsrpt.parse_txt(["v=TLSRPTv1; rua=mailto:a@b", "v=TLSRPTv1; rua=mailto:c@d"]) \
        is None
    assert tlsrpt.parse_txt(["v=spf1 -all"]) is None


def test_mail_form():
    rep = tlsrpt.report("2026-12-04", "example.com", [], "sender.example",
                        "postmaster@sender.example", "r1@sender.example")
    data = tlsrpt.mail_message(rep, "example.com", "sender.example",
                               "postmaster@sender.example", "rua@example.com")
    m = email.message_from_bytes(data)
    assert m.get_content_type() == "multipart/report"
    assert m.get_param("report-type") == "tlsrpt"
    assert m["TLS-Report-Domain"] == "example.com"
    assert m["TLS-Required"] == "No"        # delivered despite TLS failures (RFC 8460)
    assert " ".join(m["Subject"].split()) == ("Report Domain: example.com Submitter: sender.example "
                            "Report-ID: <r1@sender.example>")
    part = [p for p in m.walk() if p.get_content_type() == "application/tlsrpt+gzip"][0]
    assert part.get_filename() == ("sender.example!example.com!1796342400!1796428799!"
                                   "r1@sender.example.json.gz")
    assert json.loads(gzip.decompress(part.get_payload(decode=True))) == rep


def test_policy_record_as_postfix_reads_it():
    """Postfix's smtp_tlsrpt_find_policy(): other TXT strings ignored, v=TLSRPTv1 not
    followed by ";" malformed (warned, ignored), two good records are none."""
    warned = []
    rua = "rua=mailto:r@example.com"
    assert tlsrpt.parse_txt(["v=spf1 -all", f"v=TLSRPTv1 \t; {rua}"], "example.com",
                            warned.append) == ["mailto:r@example.com"]
    assert warned == []
    assert tlsrpt.parse_txt([f"v=TLSRPTv10; {rua}", f"v=TLSRPTv1; {rua}"], "example.com",
                            warned.append) == ["mailto:r@example.com"]
    assert warned == [f'TLSRPT support: ignoring malformed policy for example.com:, '
                      f'"v=TLSRPTv10; {rua}"']
    assert tlsrpt.parse_txt([f"v=TLSRPTv1; {rua}", f"v=TLSRPTv1;{rua}"], "example.com",
                            warned.append) is None
    assert warned[-1] == "TLSRPT support: Too many TLSRPT policies for example.com"
    assert tlsrpt.parse_txt(["v=TLSRPTv1"]) is None
