"""An old main.cf that sets Postfix's former parameter names, through the real master:
smtpd honours virtual_maps (virtual_alias_maps' former name, and through it
virtual_alias_domains) and smtpd_client_connection_limit_exceptions (whose setting
empties smtpd_client_event_limit_exceptions, as Postfix 3.7's default expression does,
so that loopback clients are held to the connection limit)."""

import os

import pytest

from pfxinst import SmtpClient

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(not ROOT, reason="chroot and privilege drop need root")


def test_smtpd_honours_former_names(instance):
    instance.add_smtpd(
        virtual_maps="inline:{alias.example=x, info@alias.example=root}",
        smtpd_client_connection_limit_exceptions="192.0.2.9",
        smtpd_client_connection_count_limit="1", mynetworks="127.0.0.0/8")
    instance.master_lines.append("anvil unix - - y - 1 anvil")
    instance.start()
    first = SmtpClient(instance.port)
    try:
        assert first.reply().startswith("220 ")
        assert first.cmd("EHLO client.example").startswith("250")
        assert first.cmd("MAIL FROM:<alice@example.org>").startswith("250")
        assert first.cmd("RCPT TO:<info@alias.example>") == "250 2.1.5 Ok"
        assert first.cmd("RCPT TO:<nob@alias.example>") == (
            "550 5.1.1 <nob@alias.example>: Recipient address rejected: "
            "User unknown in virtual alias table")
        # 127.0.0.1 is in mynetworks, but no longer an exception: a second connection
        # is over the limit.
        second = SmtpClient(instance.port)
        try:
            assert second.reply() == ("421 4.7.0 mail.test.example Error: too many "
                                      "connections from 127.0.0.1")
        finally:
            second.close()
        assert first.cmd("QUIT").startswith("221")
    finally:
        first.close()
