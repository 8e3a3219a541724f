"""Shared pieces for benchmark reports: the machine, medians, markdown tables, BENCHMARKS.md sections.

    from report import machine_description, md_table, write_section, median, verdict

machine_description()       one markdown paragraph: CPU model, cores, RAM, kernel, Debian
                            version, Python version, Postfix version (`postconf -h
                            mail_version`, or `-d` without a main.cf), the date
md_table(headers, rows)     a GitHub markdown table; the first column left-aligned, the
                            others right-aligned unless `align` says otherwise
write_section(path, name, text)
                            replaces what lies between `<!-- {name}:begin -->` and
                            `<!-- {name}:end -->` in the file with text; appends the markers
                            (and text) at the end of the file when they are absent
median(values), median_of(results, key)
                            medians that skip None values (None when nothing is left)
verdict(value, target, higher=True)
                            "met" or "missed" ("n/a" when the value is missing)
command_line()              the command this process was started with, as typed
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path


# --- the machine -----------------------------------------------------------------------

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    return platform.processor() or "unknown CPU"


def ram_gib() -> float | None:
    m = re.search(r"^MemTotal:\s+(\d+) kB", _read("/proc/meminfo"), re.M)
    return int(m.group(1)) / 1048576 if m else None


def debian_version() -> str:
    version = _read("/etc/debian_version").strip()
    pretty = ""
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', _read("/etc/os-release"), re.M)
    if m:
        pretty = m.group(1)
    if pretty and version:
        return f"{pretty}, debian_version {version}"
    return pretty or version or "unknown OS"


def postfix_version() -> str:
    postconf = shutil.which("postconf", path="/usr/sbin:/usr/bin")
    if not postconf:
        return "not installed"
    # `postconf -h mail_version` needs /etc/postfix/main.cf, which a machine that only runs
    # private instances may lack; `-d` (the compiled-in default) needs nothing.
    for args in (["-h", "mail_version"], ["-d", "-h", "mail_version"]):
        try:
            out = subprocess.run([postconf, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return "unknown"


def openssl_version() -> str:
    try:
        from OpenSSL import SSL  # pyOpenSSL, as postfix-py uses it
        v = SSL.SSLeay_version(SSL.SSLEAY_VERSION)
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - optional detail
        return ""


def machine_description() -> str:
    """One markdown paragraph describing this machine and the software under test."""
    ram = ram_gib()
    parts = [
        f"CPU: {cpu_model()}, {os.cpu_count()} cores",
        f"RAM: {ram:.1f} GiB" if ram else "RAM: unknown",
        f"kernel: Linux {platform.release()}",
        f"OS: {debian_version()}",
        f"Python: {platform.python_version()}",
    ]
    ssl = openssl_version()
    if ssl:
        parts.append(f"pyOpenSSL's {ssl}")
    parts.append(f"Postfix: {postfix_version()}")
    parts.append(f"date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    return "Machine — " + "; ".join(parts) + "."


def command_line() -> str:
    """The command that started this process, relative paths kept as typed."""
    exe = sys.executable
    try:
        rel = os.path.relpath(exe)
        if not rel.startswith(".."):
            exe = rel
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in [exe, *sys.argv])


# --- numbers -----------------------------------------------------------------------------

def median(values):
    """The median of the values that are not None; None when there are none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def median_of(results, key):
    """The median of result[key] over a list of dicts, skipping missing values."""
    return median(r.get(key) for r in results)


def ratio(a, b):
    """a / b, or None when either is missing or b is 0."""
    if a is None or not b:
        return None
    return a / b


def verdict(value, target, higher: bool = True) -> str:
    """Whether value meets target: at least it (higher=True) or at most it."""
    if value is None:
        return "n/a"
    return "met" if (value >= target if higher else value <= target) else "missed"


def fmt(value, spec: str = ".0f", suffix: str = "", missing: str = "–") -> str:
    """Format a number, or `missing` for None."""
    if value is None:
        return missing
    return f"{value:{spec}}{suffix}"


def pct(value, missing: str = "–") -> str:
    """A share 0..1 as a percentage (one decimal below 100% so 99.8% is not shown as 100%)."""
    if value is None:
        return missing
    if value >= 1:
        return "100%"
    return f"{value * 100:.1f}%"


# --- markdown -----------------------------------------------------------------------------

def md_table(headers, rows, align=None) -> str:
    """A markdown table. align: a string of 'l'/'r'/'c' per column (default 'l' then 'r's)."""
    headers = [str(h) for h in headers]
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    for row in rows:
        cells = ["" if c is None else str(c).replace("|", "\\|").replace("\n", " ")
                 for c in row]
        cells += [""] * (len(headers) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_section(path, name: str, text: str) -> None:
    """Put text between the `<!-- name:begin -->` and `<!-- name:end -->` markers of a file.

    The markers stay; whatever was between them is replaced. When the file lacks them
    they are appended at its end (the file is created if it does not exist)."""
    path = Path(path)
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = ""
    body = f"{begin}\n{text.strip()}\n{end}"
    i = old.find(begin)
    j = old.find(end, i + len(begin)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        new = old[:i] + body + old[j + len(end):]
    else:
        sep = "" if not old or old.endswith("\n\n") else ("\n" if old.endswith("\n") else "\n\n")
        new = old + sep + body + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


if __name__ == "__main__":
    print(machine_description())
