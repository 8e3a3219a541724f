"""No program imports another program; lib/ imports no program.

The rule of the code base (README, DESIGN.md): each top-level folder that setup.cfg
installs as a package is a program (smtpd, smtp, qmgr, local, master, tlsmgr, and any
new one), except lib/ (shared code), tools/ (the commands) and conf/ (data). A program
may import lib/ and its own folder; lib/ imports lib/ only; tools/ import lib/, and
tools/posttls_finger.py the smtp client too (Postfix's posttls-finger is built from the
smtp client's TLS code), and pickup/service.py smtpd's session (`sendmail -bs` is
Postfix's smtpd in stand-alone mode). Every module's imports are read with ast, relative
(`from ..smtp import x`) and absolute (`postfix_py.smtp`) alike, wherever they stand in
the module.
"""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOT_PROGRAMS = {"lib", "tools", "conf"}
# pickup serves `sendmail -bs` with smtpd's own session, as Postfix's sendmail -bs runs
# smtpd in its stand-alone mode: the one program that reuses another program's code.
EXCEPTIONS = {("tools", "posttls_finger.py"): {"smtp"}, ("pickup", "service.py"): {"smtpd"},
              # `postfix-py tls explain`: the smtp client's own decisions, as posttls-finger
              ("tools", "tls_explain.py"): {"smtp"}}


def packages() -> list[str]:
    """The top-level folders setup.cfg installs (postfix_py.NAME = NAME)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    dirs = cfg["options"]["package_dir"]
    out = []
    for line in dirs.strip().splitlines():
        name, _, folder = line.partition("=")
        if name.strip().startswith("postfix_py."):
            out.append(folder.strip())
    return out


PACKAGES = packages()
PROGRAMS = [p for p in PACKAGES if p not in NOT_PROGRAMS]


def imported_folders(text: str, rel: Path) -> set[str]:
    """The top-level folders of the repository that a module (at rel) imports."""
    tree = ast.parse(text, str(rel))
    package = ["postfix_py", *rel.parts[:-1]]           # the module's own package
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            # Relative: `.` is the module's package, each further dot one package up.
            if node.level > len(package):
                out.add("..")                           # above postfix_py: never right
                continue
            full = package[:len(package) - node.level + 1] + \
                (node.module.split(".") if node.module else [])
            if len(full) > 1:
                out.add(full[1])
            else:
                out.update(a.name for a in node.names)  # `from .. import smtp`
            continue
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "postfix_py" and len(parts) > 1:
                out.add(parts[1])
            elif parts[0] in PACKAGES:
                out.add(parts[0])
    return out & (set(PACKAGES) | {".."})


def allowed_for(rel: Path) -> set[str]:
    """What the module at rel may import."""
    folder = rel.parts[0]
    if folder == "lib":
        return {"lib"}
    if folder == "tools":
        return {"lib", "tools"} | EXCEPTIONS.get((folder, rel.name), set())
    if folder == "conf":
        return set()
    return {"lib", folder} | EXCEPTIONS.get((folder, rel.name), set())


def modules():
    for folder in PACKAGES:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_setup_cfg_lists_the_programs():
    assert {"lib", "smtpd", "smtp", "qmgr", "local", "master", "tlsmgr"} <= set(PACKAGES)
    assert "lib" not in PROGRAMS and "smtp" in PROGRAMS


@pytest.mark.parametrize("rel", [p.relative_to(ROOT) for p in modules()], ids=str)
def test_imports_follow_the_layers(rel):
    used = imported_folders((ROOT / rel).read_text(encoding="utf-8"), rel)
    allowed = allowed_for(rel)
    assert used <= allowed, f"{rel} imports {sorted(used - allowed)}"


@pytest.mark.parametrize("text,rel,found,ok", [
    ("from ..smtpd import session\n", "smtp/x.py", {"smtpd"}, False),
    ("import postfix_py.qmgr.manager\n", "local/x.py", {"qmgr"}, False),
    ("def f():\n    from ..master import init\n", "smtp/x.py", {"master"}, False),
    ("from .. import local\n", "qmgr/x.py", {"local"}, False),
    ("from ..qmgr import bounce_log\n", "tools/postqueue.py", {"qmgr"}, False),
    ("from ..smtp import session\n", "lib/x.py", {"smtp"}, False),
    ("from ..smtp import session\n", "tools/posttls_finger.py", {"smtp"}, True),
    ("from ..smtp import session\n", "tools/sendmail.py", {"smtp"}, False),
    ("from ..lib import msg\nfrom . import nexthop\n", "smtp/x.py", {"lib", "smtp"}, True),
    ("from postfix_py.lib import attr\nimport os\n", "tlsmgr/x.py", {"lib"}, True),
    ("from . import attr\n", "lib/x.py", {"lib"}, True),
])
def test_the_check_sees_every_spelling(text, rel, found, ok):
    used = imported_folders(text, Path(rel))
    assert used == found and (used <= allowed_for(Path(rel))) == ok
