"""Every parameter in lib/params.py is read by product code (issue 13).

A parameter that postfix-py declares is one it honours; a parameter that nothing reads is
accepted and silently ignored, which is what the issue forbids. This test reads the
parameter table and the source of every product package (the top-level folders that
setup.cfg maps to postfix_py.*: never tests/ or bench/), and fails for every parameter that
no product code reads.

A parameter counts as read when
  * its name is a string literal in product code other than lib/params.py; or
  * it is `W_X` (W one word: smtp, lmtp, smtpd, a transport name) and product code builds
    it as f"{...}_X" (a prefix or transport name in front, nothing else: lib/tls.py's
    f"{prefix}_tls_loglevel", qmgr's f"{name}_destination_recipient_limit"); or
  * it is `smtp_X`, `lmtp_X` or `smtpd_X` and "X" (containing an underscore) is a string
    literal: the TLS code and the smtp/lmtp client read these through a prefix helper
    (smtp/session.py's p("tls_note_starttls_offer"), smtp/sasl.py's
    _param(cfg, prefix, "sasl_auth_enable"), lib/tls.py's
    _legacy_pair(cfg, prefix, "tls_dcert_file", "tls_dkey_file")); or
  * it is built by an f-string whose placeholders are filled with string literals of the
    same function or module constants (lib/tls.py's f"tls_{grade}_cipherlist" for grade
    in GRADES, smtp/session.py's f"{n}_timeout" for n in a tuple of names), the result
    counting as a literal in the rules above; or
  * its name is referenced as $name / ${name...} in the default of a parameter that is
    read (smtpd_tls_key_file = $smtpd_tls_cert_file; ${stress?...}).

A former name (params.FORMER_NAMES: Postfix's old name of a renamed parameter) is the one
difference: it is read only through its new name's default, never by product code
directly (one home: programs ask for the new name). It counts as read when its new name
is read and the new name's default refers to it; former_name_problems() says where not.
"""

from __future__ import annotations

import ast
import configparser
import itertools
import re
from pathlib import Path

from postfix_py.lib import params

REPO = Path(__file__).resolve().parents[2]

_FILL_LIMIT = 4096          # combinations tried for one f-string
_REF = re.compile(r"\$\{?([A-Za-z0-9_]+)")


def product_dirs() -> list[Path]:
    """The repository's product packages, from setup.cfg's package_dir."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    dirs = []
    for line in cfg["options"]["package_dir"].strip().splitlines():
        _, _, folder = line.partition("=")
        folder = folder.strip()
        assert folder and not folder.startswith(("tests", "bench")), line
        dirs.append(REPO / folder)
    return dirs


def _skeleton(node: ast.JoinedStr) -> list[str | None]:
    """An f-string as constant parts and None for each placeholder."""
    parts: list[str | None] = []
    for value in node.values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            parts.append(value.value)
        else:
            parts.append(None)
    return parts


def _literals(node) -> set[str]:
    return {n.value for n in ast.walk(node)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _module_constants(tree: ast.Module) -> set[str]:
    """String literals assigned at module level (GRADES = ("high", ...))."""
    out: set[str] = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            out |= _literals(stmt.value)
    return out


def scan() -> tuple[set[str], set[str]]:
    """(string literals and filled f-strings, "_X" tails of f"{...}_X") of product code."""
    literals: set[str] = set()
    tails: set[str] = set()
    for folder in product_dirs():
        for path in sorted(folder.rglob("*.py")):
            if path == REPO / "lib" / "params.py":
                continue
            tree = ast.parse(path.read_text(), str(path))
            literals |= _literals(tree)
            constants = _module_constants(tree)
            scopes = [n for n in ast.walk(tree)
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for scope in scopes:
                words = sorted(w for w in _literals(scope) | constants
                               if re.fullmatch(r"[A-Za-z0-9_]{1,40}", w))
                for node in ast.walk(scope):
                    if not isinstance(node, ast.JoinedStr):
                        continue
                    parts = _skeleton(node)
                    if len(parts) == 2 and parts[0] is None and parts[1] and \
                            parts[1].startswith("_"):
                        tails.add(parts[1])
                    holes = parts.count(None)
                    if not holes or len(words) ** holes > _FILL_LIMIT:
                        continue
                    for combo in itertools.product(words, repeat=holes):
                        it = iter(combo)
                        literals.add("".join(p if p is not None else next(it) for p in parts))
    return literals, tails


def unread_parameters() -> list[str]:
    literals, tails = scan()

    def read_directly(name: str) -> bool:
        if name in literals:
            return True
        head, sep, rest = name.partition("_")
        if sep and rest and "_" + rest in tails:
            return True
        return head in ("smtp", "lmtp", "smtpd") and "_" in rest and rest in literals

    read = {row.name for row in params.PARAMS
            if row.name not in params.FORMER_NAMES and read_directly(row.name)}
    # A parameter referenced in the default of a parameter that is read is read with it.
    changed = True
    while changed:
        changed = False
        for row in params.PARAMS:
            if row.name in read:
                for ref in _REF.findall(row.default):
                    if params.lookup(ref) and ref not in read:
                        read.add(ref)
                        changed = True
    return sorted(row.name for row in params.PARAMS if row.name not in read)


def former_name_problems() -> list[str]:
    """Former names that product code reads directly, or that their new name's default
    does not refer to."""
    literals, _ = scan()
    problems = []
    for former, new in sorted(params.FORMER_NAMES.items()):
        if params.lookup(former) is None or params.lookup(new) is None:
            problems.append(f"{former} -> {new}: not declared")
        elif former not in _REF.findall(params.lookup(new).default):
            problems.append(f"{new}: its default does not refer to {former}")
        if former in literals:
            problems.append(f"{former}: read by product code (read {new} instead)")
    return problems


def test_product_source_is_found():
    dirs = {d.name for d in product_dirs()}
    assert {"lib", "smtpd", "smtp", "qmgr", "local", "master", "tlsmgr", "tools"} <= dirs
    literals, _ = scan()
    assert "smtpd_banner" in literals and len(literals) > 1000


def test_every_parameter_is_read():
    unread = set(unread_parameters())
    assert unread == set(), \
        "declared in lib/params.py but read by no product code (implement or remove)"


def test_former_names_are_read_through_their_new_names_default():
    assert len(params.FORMER_NAMES) >= 8
    assert former_name_problems() == []


def test_the_rules_are_strict():
    # Names no product code builds: a made-up row is reported unread.
    fake = params.Param("smtpd_tls_not_a_parameter_xyz", "", params.STR, "x" * 20)
    try:
        params.PARAMS.append(fake)
        assert "smtpd_tls_not_a_parameter_xyz" in unread_parameters()
    finally:
        params.PARAMS.remove(fake)


def test_a_former_name_is_not_read_on_its_own():
    # A former name that no default refers to is unread, though product code names it.
    fake = params.Param("smtpd_banner_former_xyz", "", params.STR, "x" * 20)
    try:
        params.PARAMS.append(fake)
        params._BY_NAME[fake.name] = fake
        params.FORMER_NAMES[fake.name] = "smtpd_banner"
        assert "smtpd_banner_former_xyz" in unread_parameters()
        assert former_name_problems() == \
            ["smtpd_banner: its default does not refer to smtpd_banner_former_xyz"]
        # Product code naming a former name is a problem: "smtpd_banner" stands in for
        # a literal that product code has.
        params.FORMER_NAMES["smtpd_banner"] = "smtpd_timeout"
        assert "smtpd_banner: read by product code (read smtpd_timeout instead)" in \
            former_name_problems()
    finally:
        params.PARAMS.remove(fake)
        del params._BY_NAME[fake.name]
        params.FORMER_NAMES.pop(fake.name, None)
        params.FORMER_NAMES.pop("smtpd_banner", None)
