"""The header rewriting cases that postfix.json records Postfix's output for.

Shared by make_reference.py (which runs Debian's Postfix) and
tests/unit/test_header_rewrite.py (which runs lib/cleanup.py).
"""

# main.cf settings of both (@DIR@: the directory of the tables)
MAIN = {
    "myhostname": "mx.test.example", "mydomain": "test.example",
    "myorigin": "origin.example", "mydestination": "",
    "remote_header_rewrite_domain": "remote.example",
    "canonical_maps": "texthash:@DIR@/canonical",
    "masquerade_domains": "example.com",
}
TABLES = {"canonical": (
    "alice@old.example alice@new.example\n"
    "@legacy.example @modern.example\n"
    "@short.example @a-considerably-longer-domain-name.example\n"
    "a1@chain.example a2@chain.example\n"
    "a2@chain.example a3@chain.example\n"
    "joe@origin.example joe.user@origin.example\n"
    "Joe Smith@legacy.example joe.smith@modern.example\n")}
ALT = {"append_dot_mydomain": "yes", "swap_bangpath": "no", "allow_percent_hack": "no"}
# name -> (header rewrite context, trivial-rewrite settings, cleanup settings)
SCENARIOS = {"local": ("local", {}, {}), "remote": ("remote", {}, {}),
             "local-alt": ("local", ALT, {}), "remote-alt": ("remote", ALT, {}),
             "local-limit": ("local", {}, {"header_address_token_limit": "5"})}

_DATED = "Message-Id: <case@test.example>\nDate: Mon, 7 Dec 2026 10:00:00 +0000\n"
CASES = {
    "long-to": _DATED + "From: alice@old.example\nTo: " + ", ".join(
        f"user{i}@short.example" for i in range(8)) + "\nSubject: a long list",
    "names": _DATED + 'From: Alice Old <alice@old.example>\nTo: bob@legacy.example, '
    '"Carl, C." <carl@host.example.com> (work), dave\nCc: "Eve E." <eve@short.example>, '
    "Frank (the boss) <frank@short.example>",
    "percent-bang": _DATED + "From: alice@old.example\nTo: user%legacy.example\n"
    "Cc: legacy.example!user, a.example!b.example!user, joe\n"
    "Bcc: x%y%z, joe%legacy.example@keep.example",
    "bare-and-dots": _DATED + "From: joe\nTo: u@legacy.example., v@localhost\n"
    "Cc: w@keep.example",
    "group": _DATED + "From: alice@old.example\nTo: team: x@legacy.example, "
    "y@legacy.example;, z@keep.example\nCc: undisclosed-recipients:;",
    "route-and-quotes": _DATED + "From: alice@old.example\n"
    "To: <@relay.example:u@legacy.example>, \"joe smith\"@legacy.example\n"
    "Cc: \"a@b\"@legacy.example, \"Joe Smith\"@legacy.example",
    "no-comma": _DATED + "From: alice@old.example\nTo: a@legacy.example b@legacy.example",
    "unchanged": _DATED + "From: Someone <someone@keep.example>\n"
    "To: bob@keep.example,\n\tcarl@keep.example\nReply-To: <>",
    "folded-input": _DATED + "From: alice@old.example\nTo: a@legacy.example,\n"
    "    b@keep.example,\n\tc@short.example",
    "chain": _DATED + "From: a1@chain.example\nReply-To: Alice <a1@chain.example>\n"
    "Sender: alice@host.example.com",
    "long-comment": _DATED + "From: alice@old.example\nTo: x@legacy.example (" +
    "a very long comment " * 14 + ")",
    "resent": _DATED + "From: alice@old.example\nResent-From: joe\n"
    "Resent-Message-Id: <resent@test.example>\nResent-Date: Mon, 7 Dec 2026 11:00:00 +0000\n"
    "Resent-To: r1@short.example, r2@short.example, r3@short.example, r4@short.example, "
    "r5@short.example",
    "utf8": _DATED + "From: J\u00f6rg <j\u00f6rg@legacy.example>\n"
    "To: \u00e5sa@short.example, \u00e9mile@short.example, "
    "\u00fcber@short.example, \u00f8ystein@short.example",
    "comments-and-literals": _DATED + "From: Joe <joe(home)@legacy.example>\n"
    "To: u@[192.0.2.1], (lead) v@legacy.example, w@legacy.example(tail),\n"
    " \"\" <x@legacy.example>, <y@legacy.example.>\n"
    "Cc: a\\ b@legacy.example, \"q\\\"uote\"@legacy.example, odd@, @legacy.example",
    "names-and-case": _DATED + "FROM: alice@old.example\nTO:bob@legacy.example\n"
    "cc :  carl@legacy.example\nReply-To: Team List: ann@legacy.example,\n"
    "\tben@legacy.example; (end)\nSender: Johnny B. Goode <johnny@legacy.example>",
}

# what delivery and smtpd add: the mbox From_ line, Return-Path:, Delivered-To:,
# X-Original-To:, the
# Received: header
_ADDED = ("return-path:", "delivered-to:", "x-original-to:", "received:")


def strip_added(lines: list[str]) -> list[str]:
    """The header lines without those of the headers that delivery and smtpd add."""
    out, dropping = [], False
    for line in lines:
        if line[:1] in (" ", "\t"):
            if not dropping:
                out.append(line)
            continue
        dropping = line.lower().startswith(_ADDED) or line.startswith("From ")
        if not dropping:
            out.append(line)
    return out
