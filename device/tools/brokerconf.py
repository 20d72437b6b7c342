"""Render the shipped Mosquitto files (deploy/mosquitto/) for one fleet.

``edge-infer.acl`` is a template in two ways (its header says why): its topics
use the default prefix ``edge-infer``, and its ``user worker:{worker}`` and
``user reader:{reader}`` blocks stand for one block per worker id / reader
name. ``render_acl`` fills both in; ``render_conf`` replaces the values of
named options of ``edge-infer-tls.conf`` (paths, the listener's port) and
refuses an option the file does not have, so what is tested and deployed is
the shipped file with its paths changed, never a copy of its rules.

    python -m edge_infer.tools.brokerconf acl deploy/mosquitto/edge-infer.acl \\
        --prefix edge-infer --pki /srv/edge-infer-pki -o /etc/mosquitto/edge-infer.acl
    python -m edge_infer.tools.brokerconf conf deploy/mosquitto/edge-infer-tls.conf \\
        --set listener=8883 --set cafile=/etc/mosquitto/edge-infer/ca.pem -o /etc/mosquitto/conf.d/edge-infer-tls.conf
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from ..config import topic_prefix as _prefix_problem
from ..config import topic_safe_id
from ..errors import EdgeInferError

DEFAULT_PREFIX = "edge-infer"
#: placeholder -> what it stands for
PLACEHOLDERS = {"worker": "worker id", "reader": "reader name"}
_RULE_RE = re.compile(r"^(topic|pattern)(\s+(?:read|write|readwrite|deny))?\s+(\S.*)$")
_USER_RE = re.compile(r"^user\s+(\S.*)$")
_PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")


class BrokerConfError(EdgeInferError):
    """A template or a value given for it is wrong."""

    exit_code = 2


def _check_names(kind: str, names: Iterable[str]) -> list[str]:
    out = list(dict.fromkeys(names))
    for name in out:
        problem = topic_safe_id(name)
        if problem:
            raise BrokerConfError(f"{PLACEHOLDERS[kind]} {name!r} {problem}")
    return out


def _blocks(lines: list[str]) -> list[tuple[str | None, list[str]]]:
    """Split into (placeholder or None, lines): a template block runs from a ``user`` line naming a
    placeholder to the next ``user`` line or ``# ----`` section heading."""
    out: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in lines:
        s = line.strip()
        user = _USER_RE.match(s)
        if user or s.startswith("# ----"):
            kinds = set(_PLACEHOLDER_RE.findall(user.group(1))) if user else set()
            if len(kinds) > 1 or (kinds and not kinds <= PLACEHOLDERS.keys()):
                raise BrokerConfError(f"ACL template line {s!r}: one placeholder of {sorted(PLACEHOLDERS)} per block")
            out.append((kinds.pop() if kinds else None, []))
        out[-1][1].append(line)
    return out


def _with_prefix(line: str, prefix: str) -> str:
    m = _RULE_RE.match(line.strip())
    if not m:
        return line
    topic = m.group(3)
    if topic != DEFAULT_PREFIX and not topic.startswith(DEFAULT_PREFIX + "/"):
        raise BrokerConfError(f"ACL template rule {line.strip()!r} does not start with the prefix {DEFAULT_PREFIX}/")
    return f"{m.group(1)}{m.group(2) or ''} {prefix}{topic[len(DEFAULT_PREFIX):]}"


def render_acl(template: str, *, prefix: str = DEFAULT_PREFIX, workers: Sequence[str] = (),
               readers: Sequence[str] = (), source: str = "edge-infer.acl") -> str:
    """The ACL for ``prefix`` with one block per worker and per reader (none: the block is left out)."""
    problem = _prefix_problem(prefix)
    if problem:
        raise BrokerConfError(f"topic prefix {prefix!r} {problem}")
    names = {"worker": _check_names("worker", workers), "reader": _check_names("reader", readers)}
    out = [f"# Rendered by edge_infer.tools.brokerconf from {source}: prefix {prefix}, "
           f"{len(names['worker'])} worker(s), {len(names['reader'])} reader(s). Edit the template, not this file."]
    for kind, lines in _blocks(template.splitlines()):
        lines = [_with_prefix(line, prefix) for line in lines]
        if kind is None:
            out += lines
            continue
        for i, name in enumerate(names[kind]):
            for line in lines:
                if i and line.lstrip().startswith("#"):
                    continue    # the block's comments once, at its first copy
                out.append(line.replace("{" + kind + "}", name))
    text = "\n".join(out) + "\n"
    left = [line for line in text.splitlines() if not line.lstrip().startswith("#") and _PLACEHOLDER_RE.search(line)]
    if left:
        raise BrokerConfError(f"ACL template has unknown placeholders: {left[0]!r}")
    return text


def render_conf(template: str, values: Mapping[str, str], *, extra: str = "") -> str:
    """The config with the value of each option in ``values`` replaced; each must occur exactly once.

    ``extra`` (lines for options the file does not set, such as persistence_location on a test
    broker) is appended after a comment saying so."""
    seen: dict[str, int] = dict.fromkeys(values, 0)
    out = []
    for line in template.splitlines():
        key = line.split(None, 1)[0] if line.strip() and not line.lstrip().startswith("#") else None
        if key in values:
            seen[key] += 1
            line = f"{key} {values[key]}"
        out.append(line)
    wrong = {k: n for k, n in seen.items() if n != 1}
    if wrong:
        raise BrokerConfError("broker config template: " + ", ".join(
            f"option {k!r} occurs {n} times (expected once)" for k, n in wrong.items()))
    text = "\n".join(out) + "\n"
    if extra:
        text += "\n# ---- added where it runs (not part of the shipped file) ----\n" + extra.rstrip("\n") + "\n"
    return text


def pki_workers(pki_dir: Path) -> list[str]:
    """The worker ids a PKI directory (edge-infer pki) issued certificates to: workers/<id>/cert.pem."""
    root = Path(pki_dir) / "workers"
    if not root.is_dir():
        raise BrokerConfError(f"{pki_dir} has no workers/ folder: is it an edge-infer pki directory?")
    return sorted(p.parent.name for p in root.glob("*/cert.pem"))


def pki_readers(pki_dir: Path) -> list[str]:
    """The reader names a PKI directory issued certificates to: readers/<name>/cert.pem (none: no folder)."""
    return sorted(p.parent.name for p in (Path(pki_dir) / "readers").glob("*/cert.pem"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_infer.tools.brokerconf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("acl", help="render deploy/mosquitto/edge-infer.acl")
    a.add_argument("template", type=Path)
    a.add_argument("--prefix", default=DEFAULT_PREFIX, help="mqtt.topic_prefix of the fleet (default edge-infer)")
    a.add_argument("--worker", action="append", default=[], help="a worker id (its CN is worker:<id>); repeat")
    a.add_argument("--pki", type=Path, help="add every worker and reader of this edge-infer pki directory")
    a.add_argument("--reader", action="append", default=[], help="an integrator (CN reader:<name>); repeat")
    a.add_argument("-o", "--output", type=Path, help="write here (default: standard output)")
    c = sub.add_parser("conf", help="render deploy/mosquitto/edge-infer-tls.conf with other paths or port")
    c.add_argument("template", type=Path)
    c.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="replace an option's value")
    c.add_argument("-o", "--output", type=Path)
    args = p.parse_args(argv)
    try:
        if args.what == "acl":
            workers = list(args.worker) + (pki_workers(args.pki) if args.pki else [])
            readers = list(args.reader) + (pki_readers(args.pki) if args.pki else [])
            text = render_acl(args.template.read_text(), prefix=args.prefix, workers=workers, readers=readers,
                              source=args.template.name)
        else:
            bad = [s for s in args.set if "=" not in s]
            if bad:
                raise BrokerConfError(f"--set takes OPTION=VALUE, not {bad[0]!r}")
            text = render_conf(args.template.read_text(), dict(s.split("=", 1) for s in args.set))
    except (OSError, EdgeInferError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    if args.output:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
