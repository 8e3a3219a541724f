"""lib/dsn.py: RFC 3461 parameter syntax, as Postfix's dsn_mask.c, xtext.c, uxtext.c."""

import pytest
from hypothesis import given, strategies as st

from postfix_py.lib import dsn


@pytest.mark.parametrize("text,mask", [
    ("NEVER", "NEVER"), ("never", "NEVER"), ("delay,success", "SUCCESS,DELAY"),
    ("FAILURE", "FAILURE"), ("NEVER,FAILURE", None), ("", None), ("SUCCESS,", None),
    ("SUCCESS,SUCCESS", None), ("BOGUS", None)])
def test_notify(text, mask):
    assert dsn.notify_mask(text) == mask


def test_ret_envid_orcpt():
    assert dsn.ret_code("full") == "FULL" and dsn.ret_code("X") is None
    assert dsn.envid("a+2Bb+3D") == "a+b="
    assert dsn.envid("a+00") is None and dsn.envid("a=b") is None and dsn.envid("+4") is None
    assert dsn.orcpt("rfc822;a+2Bb@x") == "rfc822;a+b@x"
    assert dsn.orcpt("utf-8;j\\x{F6}rg@x") == "utf-8;j\u00f6rg@x"
    assert dsn.orcpt("utf-8;jörg@x") == "utf-8;jörg@x"
    assert dsn.orcpt("rfc822") is None and dsn.orcpt(";a@x") is None
    assert dsn.orcpt("rfc822;a+0") is None and dsn.orcpt("utf-8;\\x{D800}") is None


def test_orcpt_param_as_postfix_sends_it():
    assert dsn.orcpt_param("", "bob@x", False) == "rfc822;bob@x"
    assert dsn.orcpt_param("rfc822;a+b=c@x", "y@x", False) == "rfc822;a+2Bb+3Dc@x"
    assert dsn.orcpt_param("", "j\u00f6rg@x", True) == "utf-8;j\\x{F6}rg@x"
    assert dsn.orcpt_param("", "j\u00f6rg@x", False) == "rfc822;j+C3+B6rg@x"


@given(st.binary(max_size=40))
def test_xtext_round_trip(data):
    assert dsn.xtext_unquote(dsn.xtext_quote(data)) == data


@given(st.text(max_size=30).filter(lambda t: "\0" not in t))
def test_uxtext_round_trip(text):
    quoted = dsn.uxtext_quote(text)
    assert dsn.uxtext_unquote(quoted) == text
