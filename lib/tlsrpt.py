"""TLSRPT (RFC 8460): outbound TLS outcomes per policy domain, and the daily reports.

NAME
    tlsrpt - record what outbound TLS did, and report it to the domains that ask

DESCRIPTION
    With smtp_tlsrpt_enable = yes (Postfix 3.10's name; Postfix hands the events to an
    external library, postfix-py keeps them itself), the smtp client records each
    session's TLS outcome for MX-based deliveries to a domain that asks for reports,
    that is, publishes one valid `_smtp._tls` TXT record (v=TLSRPTv1 with a mailto: or
    https: rua; as Postfix, no record means no report and nothing recorded). The
    answer is cached per process (class Policies: the record's TTL, at most an hour);
    a lookup that fails for now costs a delivery at most POLICY_TIMEOUT seconds once a
    minute, and its outcome is recorded all the same, for `tlsrpt send` to judge with
    the same rule (parse_txt). Recorded are the policy domain (the next-hop
    domain), the policy (type sts with the MTA-STS policy text and mx patterns, tlsa for
    DANE, no-policy-found otherwise), and the result: success, or a failure type of RFC
    8460 section 4.3 with the sending and receiving addresses and the MX host name.
    With smtp_tlsrpt_skip_reused_handshakes = yes (Postfix 3.10's default, 3.11's is no),
    sessions that resumed a cached TLS session are not counted. Sessions at the may level
    with a server that does not offer STARTTLS are not recorded (opportunistic TLS that was not there is no policy failure); failures of
    MTA-STS discovery are (sts-policy-fetch-error, sts-policy-invalid,
    sts-webpki-invalid).

    Store: one LMDB file (tlsrpt_database, default $data_directory/tlsrpt.lmdb, outside the
    jail), opened by every smtp process before its chroot; LMDB's lock file serialises
    the writers. One entry per UTC day, domain and policy, holding the counters.

    Reports: `postfix-py tlsrpt send` (tools/tlsrpt.py; run it daily from cron, as
    Postfix's TLSRPT reporter runs beside it) sends every day before the current UTC day
    to the `rua` of the domain's `_smtp._tls` TXT record (v=TLSRPTv1): https: URIs get
    a POST of the gzipped JSON report (application/tlsrpt+gzip), mailto: URIs a
    multipart/report message (report-type=tlsrpt, RFC 8460 section 5.3) submitted
    through the local pickup service. A day is deleted once one rua took it, or when
    the domain has no rua, or after MAX_TRIES days of failures; a temporary DNS failure
    keeps it for the next run.

    DKIM: RFC 8460 section 3 wants a mailed report signed with DKIM by the reporting
    domain (no l= tag; the key record should say s=tlsrpt). postfix-py does not sign it
    itself, exactly as Postfix's tlsrpt-reporter, which mails through `sendmail -i -t`
    and leaves signing to the MTA: the report enters through pickup, a local submission
    like any other, so the signing milter of non_smtpd_milters (OpenDKIM, for example,
    with the tlsrpt_sender domain among its signing domains) signs it, with the keys and
    policy that sign the site's other mail; there is no second signer to configure.
    Without such a milter the reports go out unsigned, and receivers may ignore them
    (tests/integration/test_tlsrpt_dkim.py proves the route with Debian's OpenDKIM).
    The message carries "TLS-Required: No" (RFC 8689, as tlsrpt-reporter's): the smtp
    client then delivers it despite DANE or MTA-STS failures at the report's
    destination, and does not count that session for TLSRPT (RFC 8460 section 3).

FUNCTIONS AND CLASSES
    classify(offered, tls_active, info, name_matched, require_auth) -> result type or
        "" (success).
    Store(path, map_size).record(domain, policy, result, sending_ip, mx_host, ip,
        day=None); .days() -> {(day, domain): [entries]}; .delete(day, domain); .close()
    policy_dict(kind, domain, text="", mx=()) -> RFC 8460 policy object (tlsa: text the
        records, domain the TLSA base domain, as Postfix)
    report(day, domain, entries, org, contact, report_id) -> dict (RFC 8460 section 4.4)
    parse_txt(strings, domain="", warn=None) -> rua list or None (no usable record).
    Policies(resolver, timeout=POLICY_TIMEOUT).wanted(domain) -> bool: record for it?
    mail_message(report, domain, org, sender, rcpt, gzipped) -> bytes, with
        TLS-Report-Domain, TLS-Report-Submitter and TLS-Required: No
    Sender(cfg, resolver, submit, ctx).send_due(today, include_today=False) -> counts

CONFIGURATION PARAMETERS
    smtp_tlsrpt_enable (no), smtp_tlsrpt_skip_reused_handshakes (no), tlsrpt_database ($data_directory/tlsrpt.lmdb),
    tlsrpt_organization_name ($myhostname), tlsrpt_contact_info
    (postmaster@$myhostname), tlsrpt_sender (postmaster@$myhostname),
    tlsrpt_https_CAfile (empty: the system's CA bundle), tlsrpt_https_timeout (30s);
    all but the smtp_tlsrpt_* are postfix-py extensions. non_smtpd_milters (pickup):
    the DKIM signer of mailed reports.

SEE ALSO
    smtp/service.py (where sessions are recorded), smtp/mta_sts.py, tools/tlsrpt.py,
    lib/https.py; RFC 8460.
"""

from __future__ import annotations

import datetime
import email.policy
import email.utils
import gzip
import hashlib
import json
import time
import uuid
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import lmdb

from . import https, msg

# Result types (RFC 8460 section 4.3)
STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
HOST_MISMATCH = "certificate-host-mismatch"
EXPIRED = "certificate-expired"
NOT_TRUSTED = "certificate-not-trusted"
VALIDATION_FAILURE = "validation-failure"
TLSA_INVALID = "tlsa-invalid"
DNSSEC_INVALID = "dnssec-invalid"
DANE_REQUIRED = "dane-required"
STS_FETCH_ERROR = "sts-policy-fetch-error"
STS_POLICY_INVALID = "sts-policy-invalid"
STS_WEBPKI_INVALID = "sts-webpki-invalid"

X509_V_ERR_HOSTNAME_MISMATCH = 62
# Postfix's tls_log_verify_error(): expired (and a bad notAfter), CERT_UNTRUSTED, and the
# errors it reports as validation-failure (self-signed, untrusted issuer, not yet valid,
# wrong purpose, chain too long); any other error (a DANE mismatch, 65, among them) is
# smtp_proto.c's certificate-not-trusted.
_EXPIRED = {10, 14}
_NOT_TRUSTED = {27}
_VALIDATION = {18, 19, 20, 9, 13, 26, 22}

MAX_TRIES = 3               # days a report is retried before it is dropped
POLICY_TTL_MAX = 3600       # seconds a TLSRPT record, or its absence, is believed at most
POLICY_RETRY = 60           # seconds before a failed TLSRPT record lookup is tried again
POLICY_TIMEOUT = 2.0        # seconds a TLSRPT record lookup may take before delivery
POLICY_CACHE_SIZE = 1000    # policy domains remembered per smtp process
NEGATIVE_TTL = 300          # seconds "no record" is believed when no SOA says
MAX_REPORT = 1 << 20        # a receiver's answer to a POST is read up to this size


def classify(offered: bool, tls_active: bool, info, name_matched: bool,
             require_auth: bool) -> str:
    """The result type of one session ("" for success)."""
    if not offered:
        return STARTTLS_NOT_SUPPORTED
    if not tls_active or info is None:
        return VALIDATION_FAILURE           # the handshake failed
    if not require_auth:
        return ""
    err = info.verify_error
    if err in _EXPIRED:
        return EXPIRED
    if err in _NOT_TRUSTED:
        return NOT_TRUSTED
    if err in _VALIDATION:
        return VALIDATION_FAILURE
    if err == X509_V_ERR_HOSTNAME_MISMATCH or (err == 0 and not name_matched):
        return HOST_MISMATCH
    if err != 0:
        return NOT_TRUSTED
    return ""


def policy_dict(kind: str, domain: str, text: str = "", mx=()) -> dict:
    """An RFC 8460 policy object: sts (with the policy's lines and mx), tlsa (text: the
    records, one a line, as Postfix's smtp_tlsrpt_set_dane_policy() writes them:
    "3 1 1 HEX"; domain: the TLSA base domain), or no-policy-found."""
    out = {"policy-type": kind, "policy-domain": domain}
    if kind == "tlsa" and text:
        out["policy-string"] = text.split("\n")
    if kind == "sts":
        out["policy-string"] = [line for line in text.replace("\r\n", "\n").split("\n")
                                if line.strip()]
        out["mx-host"] = list(mx)
    return out


def _day(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))


class Store:
    """The per-day counters in one LMDB file (see the module's docstring)."""

    def __init__(self, path: str, map_size: int = 1 << 22, readonly: bool = False,
                 warn=msg.warn):
        self.path = path
        self.warn = warn
        self.env = lmdb.open(path, subdir=False, map_size=map_size, max_dbs=0,
                             mode=0o600, metasync=False, readonly=readonly)

    @staticmethod
    def _key(day: str, domain: str, policy: dict) -> bytes:
        digest = hashlib.sha256(json.dumps(policy, sort_keys=True).encode()).hexdigest()
        return f"{day}|{domain}|{digest[:16]}".encode("ascii", "replace")

    def record(self, domain: str, policy: dict, result: str = "", sending_ip: str = "",
               mx_host: str = "", ip: str = "", day: str | None = None) -> None:
        """Count one session (result "" is a success); never raises."""
        domain = domain.lower().rstrip(".")
        key = self._key(day or _day(), domain, policy)
        try:
            with self.env.begin(write=True) as txn:
                data = txn.get(key)
                entry = json.loads(data) if data else {"policy": policy, "success": 0,
                                                       "failures": []}
                if not result:
                    entry["success"] += 1
                else:
                    detail = {"result-type": result}
                    for name, value in (("sending-mta-ip", sending_ip),
                                        ("receiving-mx-hostname", mx_host),
                                        ("receiving-ip", ip)):
                        if value:
                            detail[name] = value
                    for f in entry["failures"]:
                        if f["detail"] == detail:
                            f["count"] += 1
                            break
                    else:
                        entry["failures"].append({"detail": detail, "count": 1})
                txn.put(key, json.dumps(entry).encode())
        except (lmdb.Error, ValueError, KeyError, TypeError) as exc:
            self.warn(f"TLSRPT database {self.path}: cannot record {domain}: {exc}")

    def days(self) -> dict:
        """{(day, domain): [entries]} of everything stored."""
        out: dict = {}
        with self.env.begin() as txn:
            for key, data in txn.cursor():
                try:
                    day, domain, _ = key.decode("ascii").split("|")
                    out.setdefault((day, domain), []).append(json.loads(data))
                except (UnicodeDecodeError, ValueError):
                    continue
        return out

    def delete(self, day: str, domain: str) -> None:
        prefix = f"{day}|{domain}|".encode("ascii", "replace")
        with self.env.begin(write=True) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                while cur.key().startswith(prefix):
                    if not cur.delete():
                        break

    def close(self) -> None:
        self.env.close()


def report(day: str, domain: str, entries: list, org: str, contact: str,
           report_id: str) -> dict:
    """The aggregate report of one day and domain (RFC 8460 section 4.4)."""
    policies = []
    for entry in entries:
        failures = [dict(f["detail"], **{"failed-session-count": f["count"]})
                    for f in entry["failures"]]
        policies.append({
            "policy": entry["policy"],
            "summary": {"total-successful-session-count": entry["success"],
                        "total-failure-session-count": sum(f["count"]
                                                           for f in entry["failures"])},
            "failure-details": failures})
    return {"organization-name": org,
            "date-range": {"start-datetime": f"{day}T00:00:00Z",
                           "end-datetime": f"{day}T23:59:59Z"},
            "contact-info": contact, "report-id": report_id, "policies": policies}


MAGIC = "v=TLSRPTv1"


def parse_txt(strings, domain: str = "", warn=None) -> list[str] | None:
    """The rua URIs of the one TLSRPT record among a name's TXT strings; None when there
    is no usable one. As Postfix's smtp_tlsrpt_find_policy(): strings that do not start
    with v=TLSRPTv1 are someone else's; one that does but has no ";" after it (and
    optional blanks) is malformed and ignored; two good ones are none. Then at least one
    mailto: or https: rua, the only ones a report can go to."""
    found = None
    for s in strings:
        if not s.startswith(MAGIC):
            continue
        if s[len(MAGIC):].lstrip(" \t")[:1] != ";":
            if warn is not None:
                warn(f'TLSRPT support: ignoring malformed policy for {domain}:, "{s}"')
            continue
        if found is not None:
            if warn is not None:
                warn(f"TLSRPT support: Too many TLSRPT policies for {domain}")
            return None
        found = s
    if found is None:
        return None
    fields = {}
    for part in found.split(";"):
        name, eq, value = part.strip(" \t").partition("=")
        if eq:
            fields.setdefault(name.strip(" \t"), value.strip(" \t"))
    if fields.get("v") != "TLSRPTv1" or not fields.get("rua"):
        return None
    uris = [u.strip() for u in fields["rua"].split(",") if u.strip()]
    uris = [u for u in uris if u.lower().startswith(("mailto:", "https://"))]
    return uris or None


def _filename(org: str, domain: str, day: str, report_id: str, gzipped: bool) -> str:
    start = int(datetime.datetime.fromisoformat(day + "T00:00:00+00:00").timestamp())
    return (f"{org}!{domain}!{start}!{start + 86399}!{report_id}"
            f".json{'.gz' if gzipped else ''}")


def mail_message(rep: dict, domain: str, org: str, sender: str, rcpt: str,
                 gzipped: bool = True) -> bytes:
    """The report as a message (RFC 8460 section 5.3)."""
    day = rep["date-range"]["start-datetime"][:10]
    m = EmailMessage(policy=email.policy.default)     # LF lines, as queue files
    m["From"] = sender
    m["To"] = rcpt
    m["Subject"] = f"Report Domain: {domain} Submitter: {org} Report-ID: <{rep['report-id']}>"
    m["Date"] = email.utils.formatdate(usegmt=True)
    m["Message-ID"] = email.utils.make_msgid(domain=sender.rpartition("@")[2] or None)
    m["TLS-Report-Domain"] = domain
    m["TLS-Report-Submitter"] = org
    # RFC 8460 section 3: delivered despite TLS failures, and not counted in the next
    # report; RFC 8689's header does both in the smtp client (as tlsrpt-reporter's).
    m["TLS-Required"] = "No"
    m.set_content(f"This is an aggregate TLS report from {org} for {domain} ({day}).\n")
    data = json.dumps(rep).encode()
    subtype = "tlsrpt+gzip" if gzipped else "tlsrpt+json"
    m.add_attachment(gzip.compress(data) if gzipped else data, maintype="application",
                     subtype=subtype,
                     filename=_filename(org, domain, day, rep["report-id"], gzipped))
    m.set_type("multipart/report")
    m.set_param("report-type", "tlsrpt")
    return m.as_bytes()


def _negative_ttl(response) -> int:
    """The negative-caching time of an NXDOMAIN or NODATA answer (RFC 2308: the SOA's
    TTL, at most its minimum field), or NEGATIVE_TTL without a SOA."""
    for rrset in getattr(response, "authority", None) or ():
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, rrset[0].minimum)
    return NEGATIVE_TTL


def _query_txt(resolver: dns.resolver.Resolver, name: str, lifetime: float | None = None):
    """(strings, kind, ttl, why): kind is ok, none or again; ttl the answer's (or the
    negative) caching time; why the error text of again."""
    fail = ("Host or domain name not found. Name service error for "
            f"name={name} type=TXT: Host not found, try again")
    try:
        qname = dns.name.from_text(name.rstrip(".") + ".")
        answer = resolver.resolve(qname, "TXT", raise_on_no_answer=False, search=False,
                                  lifetime=lifetime)
    except dns.resolver.NXDOMAIN as exc:
        try:
            responses = list(exc.responses().values())
        except (AttributeError, KeyError, TypeError):
            responses = []
        return [], "none", _negative_ttl(responses[0] if responses else None), ""
    except (dns.exception.DNSException, UnicodeError, ValueError):
        return [], "again", 0, fail
    except Exception:       # noqa: BLE001 - whatever a DNS server sends
        return [], "again", 0, fail
    if answer.rrset is None:
        return [], "none", _negative_ttl(answer.response), ""
    return ([b"".join(rr.strings).decode("utf-8", "replace") for rr in answer.rrset], "ok",
            answer.rrset.ttl, "")


class Policies:
    """Which policy domains publish a TLSRPT record: the smtp client's question before
    it records an outcome (Postfix's smtp_tlsrpt_create_wrapper(): no record, no
    report). Answers are kept per process for their DNS TTL, at most POLICY_TTL_MAX
    seconds, for at most POLICY_CACHE_SIZE domains. A lookup that fails for now (no
    answer within POLICY_TIMEOUT, SERVFAIL) is Postfix's warning, and the outcome is
    recorded all the same: `postfix-py tlsrpt send` looks the record up again and drops
    the day of a domain without one; the failure is remembered for POLICY_RETRY seconds,
    so that a DNS server that does not answer delays one delivery, not each."""

    def __init__(self, resolver, timeout: float = POLICY_TIMEOUT, clock=time.monotonic,
                 warn=msg.warn):
        self.resolver = resolver
        self.timeout = timeout
        self.clock = clock
        self.warn = warn
        self.cache: dict[str, tuple[float, bool]] = {}

    def wanted(self, domain: str) -> bool:
        """True: record the outcome for domain (it has a TLSRPT record, or the lookup
        failed for now); False: it has none."""
        domain = domain.lower().rstrip(".")
        now = self.clock()
        hit = self.cache.get(domain)
        if hit is not None and hit[0] > now:
            return hit[1]
        strings, kind, ttl, why = _query_txt(self.resolver, f"_smtp._tls.{domain}",
                                             self.timeout)
        if kind == "again":
            self.warn(f"TLSRPT support: policy lookup failed for {domain}: {why}")
            wanted, ttl = True, POLICY_RETRY
        else:
            wanted = parse_txt(strings, domain, self.warn) is not None
        self.cache.pop(domain, None)
        if len(self.cache) >= POLICY_CACHE_SIZE:
            del self.cache[next(iter(self.cache))]      # the oldest entry
        self.cache[domain] = (now + max(0, min(ttl, POLICY_TTL_MAX)), wanted)
        return wanted


def _addresses(resolver, host: str) -> list[str]:
    out = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = resolver.resolve(host.rstrip(".") + ".", rdtype,
                                      raise_on_no_answer=False, search=False)
        except Exception:       # noqa: BLE001 - no address of this type
            continue
        if answer.rrset is not None:
            out += [rr.address for rr in answer.rrset]
    return out


class Sender:
    """Sends due reports (the work of `postfix-py tlsrpt send`)."""

    def __init__(self, cfg, store: Store, resolver, submit, ctx, info=msg.info,
                 warn=msg.warn):
        self.store = store
        self.resolver = resolver
        self.submit = submit                # submit(sender, rcpts, message) -> queue id
        self.ctx = ctx
        self.org = cfg.get("tlsrpt_organization_name")
        self.contact = cfg.get("tlsrpt_contact_info")
        self.sender = cfg.get("tlsrpt_sender")
        self.timeout = cfg["tlsrpt_https_timeout"]
        self.info, self.warn = info, warn

    def _post(self, uri: str, body: bytes) -> None:
        parts = urlsplit(uri)
        host = parts.hostname or ""
        port = parts.port or 443
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        addresses = [host] if host.replace(".", "").isdigit() else _addresses(
            self.resolver, host)
        resp = https.request("POST", host, port, path, self.ctx, addresses, self.timeout,
                             body=body, max_body=MAX_REPORT,
                             headers={"Content-Type": "application/tlsrpt+gzip",
                                      "User-Agent": "postfix-py TLSRPT"})
        if not 200 <= resp.status < 300:
            raise https.HttpsError("fetch", f"HTTP status {resp.status}")

    def send_one(self, day: str, domain: str, entries: list, uris: list[str]) -> bool:
        """Send one report to every rua; True when at least one took it."""
        report_id = f"{day}.{uuid.uuid4().hex}@{self.org}"
        rep = report(day, domain, entries, self.org, self.contact, report_id)
        ok = False
        for uri in uris:
            try:
                if uri.lower().startswith("https://"):
                    self._post(uri, gzip.compress(json.dumps(rep).encode()))
                    self.info(f"TLSRPT report for {domain} ({day}) posted to {uri}")
                else:
                    rcpt = unquote(uri[len("mailto:"):].split("?")[0])
                    queue_id = self.submit(self.sender, [rcpt], mail_message(
                        rep, domain, self.org, self.sender, rcpt))
                    self.info(f"{queue_id}: TLSRPT report for {domain} ({day}) to <{rcpt}>")
                ok = True
            except Exception as exc:    # noqa: BLE001 - one rua's failure is not the others'
                self.warn(f"TLSRPT report for {domain} ({day}) to {uri}: {exc}")
        return ok

    def send_due(self, now: float | None = None, include_today: bool = False) -> dict:
        """Send the reports of the days before today (and today's with include_today)."""
        today = _day(now)
        counts = {"sent": 0, "failed": 0, "no_rua": 0, "kept": 0}
        for (day, domain), entries in sorted(self.store.days().items()):
            if day >= today and not (include_today and day == today):
                continue
            strings, kind, _, _ = _query_txt(self.resolver, f"_smtp._tls.{domain}")
            if kind == "again":
                counts["kept"] += 1
                continue
            uris = parse_txt(strings, domain, self.warn)
            if uris is None:
                counts["no_rua"] += 1
                self.store.delete(day, domain)
                continue
            if self.send_one(day, domain, entries, uris):
                counts["sent"] += 1
                self.store.delete(day, domain)
            else:
                counts["failed"] += 1
                age = (datetime.date.fromisoformat(today)
                       - datetime.date.fromisoformat(day)).days
                if age >= MAX_TRIES:
                    self.warn(f"TLSRPT report for {domain} ({day}): giving up")
                    self.store.delete(day, domain)
        return counts
