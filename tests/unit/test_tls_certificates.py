"""lib/tls.py check_certificates(): what `postfix-py check`, `start` and `reload` refuse or
warn about, and smtpd_tls_chain_files read as one stream, as Postfix's load_chain_files()."""

import pytest
import trustme

from postfix_py.lib import maincf
from postfix_py.lib import tls


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    a = ca.issue_cert("a.example")
    b = ca.issue_cert("b.example")
    f = {}

    def write(name, *blobs):
        (d / name).write_bytes(b"".join(blobs))
        f[name] = str(d / name)

    write("a-key.pem", a.private_key_pem.bytes())
    write("a-chain.pem", *(p.bytes() for p in a.cert_chain_pems))
    write("a-leaf.pem", a.cert_chain_pems[0].bytes())
    write("b-both.pem", b.private_key_pem.bytes(), *(p.bytes() for p in b.cert_chain_pems))
    write("b-key.pem", b.private_key_pem.bytes())
    # a's leaf followed by a CA that did not issue it
    write("a-odd-chain.pem", a.private_key_pem.bytes(), a.cert_chain_pems[0].bytes(),
          trustme.CA().cert_pem.bytes())
    return f


def cfg_of(tmp_path, text: str):
    (tmp_path / "main.cf").write_text(text)
    return maincf.load(str(tmp_path))


def test_a_key_and_its_chain_in_separate_files(tmp_path, files):
    cfg = cfg_of(tmp_path, f"smtpd_tls_chain_files = {files['a-key.pem']}, "
                           f"{files['a-chain.pem']}, {files['b-both.pem']}\n")
    warnings = []
    assert tls.check_certificates(cfg, "smtpd", warnings.append) == 2
    assert warnings == []
    assert tls.certificate_files(cfg, "smtpd") == [
        files["a-key.pem"], files["a-chain.pem"], files["b-both.pem"]]


@pytest.mark.parametrize("text, words", [
    ("smtpd_tls_chain_files = {a-key.pem}, {b-key.pem}\n",
     "smtpd_tls_chain_files: private key in {a-key.pem} is not followed by its certificate"),
    ("smtpd_tls_chain_files = {a-chain.pem}, {a-key.pem}\n",
     "smtpd_tls_chain_files: certificate in {a-chain.pem} is not preceded by its private key"),
    ("smtpd_tls_chain_files = {b-key.pem}, {a-chain.pem}\n",
     "smtpd_tls_chain_files: the private key in {b-key.pem} does not match the certificate "
     "in {a-chain.pem}"),
    ("smtp_tls_cert_file = {a-leaf.pem}\nsmtp_tls_key_file = {b-key.pem}\n",
     "smtp_tls_key_file: the private key in {b-key.pem} does not match the certificate in "
     "{a-leaf.pem} (smtp_tls_cert_file)"),
    ("smtp_tls_cert_file = /nonexistent/c.pem\n",
     "smtp_tls_cert_file: cannot read file /nonexistent/c.pem: No such file or directory"),
])
def test_refusals_name_the_parameter_and_the_file(tmp_path, files, text, words):
    def fill(s):
        for name, path in files.items():
            s = s.replace("{" + name + "}", path)
        return s
    cfg = cfg_of(tmp_path, fill(text))
    side = text.split("_", 1)[0]
    with pytest.raises(tls.TLSConfigError) as exc:
        tls.check_certificates(cfg, side, lambda text: None)
    assert fill(words) in str(exc.value)


def test_a_chain_out_of_order_is_a_warning(tmp_path, files):
    cfg = cfg_of(tmp_path, f"lmtp_tls_chain_files = {files['a-odd-chain.pem']}\n")
    warnings = []
    assert tls.check_certificates(cfg, "lmtp", warnings.append) == 1
    assert len(warnings) == 1
    assert warnings[0].startswith(f"lmtp_tls_chain_files: certificate 2 in "
                                  f"{files['a-odd-chain.pem']} is not the issuer of "
                                  f"certificate 1")


def test_nothing_configured_is_nothing_to_check(tmp_path):
    cfg = cfg_of(tmp_path, "")
    for side in ("smtpd", "smtp", "lmtp"):
        assert tls.check_certificates(cfg, side, lambda text: None) == 0
        assert tls.certificate_files(cfg, side) == []
