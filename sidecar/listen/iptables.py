"""Traffic interception for a pod: the nat rules that send its TCP through the sidecar.

What the init container of a meshed pod runs (``pilotfish iptables``), as Istio's does:

- inbound TCP to the pod (``PREROUTING``) is redirected to the sidecar's inbound port, except
  excluded ports (the admin port, so kubelet's probes reach the sidecar itself);
- outbound TCP from the app (``OUTPUT``) is redirected to the sidecar's outbound port, except
  traffic of the sidecar's own UID (its upstream connections must leave untouched, or they
  would loop back into it), loopback, and excluded ports and CIDRs.

Every rule lives in our own chains (``PILOTFISH_*``), reached by one jump from ``PREROUTING``
and one from ``OUTPUT``, so ``clean`` removes exactly ours. Building the rules is pure
(``build_rules``, ``install_script``, ``clean_script`` take values and return text); only
``apply`` and ``clean`` run ``iptables-save`` and ``iptables-restore``. Rules go in through
``iptables-restore --noflush``: one transaction, so a pod never runs with half the rules.
IPv4 only (``iptables``, not ``ip6tables``).
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

CHAIN_PREFIX = "PILOTFISH_"
INBOUND = "PILOTFISH_INBOUND"
IN_REDIRECT = "PILOTFISH_IN_REDIRECT"
OUTPUT = "PILOTFISH_OUTPUT"
REDIRECT = "PILOTFISH_REDIRECT"
# Declared in this order; the order does not matter to iptables, it keeps the output stable.
CHAINS = (INBOUND, IN_REDIRECT, OUTPUT, REDIRECT)
# Built-in nat chains we add a jump to, and the only ones ``clean`` touches besides ours.
HOOKS = ("PREROUTING", "OUTPUT")


class InterceptionError(Exception):
    """The rules could not be read or written; the message says which command failed."""


@dataclass(frozen=True, slots=True)
class InterceptionOptions:
    """What to intercept. ``None`` in an ``include_*`` field means everything, ``()`` nothing."""

    inbound_port: int = 15006
    outbound_port: int = 15001
    # Connections the sidecar itself opens; never redirected.
    proxy_uid: int | None = 1337
    proxy_gid: int | None = None
    include_inbound_ports: tuple[int, ...] | None = None
    exclude_inbound_ports: tuple[int, ...] = (15000, 15090)
    include_outbound_cidrs: tuple[ipaddress.IPv4Network, ...] | None = None
    exclude_outbound_cidrs: tuple[ipaddress.IPv4Network, ...] = ()
    include_outbound_ports: tuple[int, ...] | None = None
    exclude_outbound_ports: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        ports = [self.inbound_port, self.outbound_port, *self.exclude_inbound_ports,
                 *self.exclude_outbound_ports, *(self.include_inbound_ports or ()),
                 *(self.include_outbound_ports or ())]
        for port in ports:
            if not 0 < port < 65536:
                raise ValueError(f"port {port} is out of range 1-65535")
        if self.proxy_uid is None and self.proxy_gid is None:
            # Without an owner exclusion the sidecar's own upstream connections loop forever.
            raise ValueError("a proxy uid or gid is required")


@dataclass(frozen=True, slots=True)
class Rule:
    """One ``-A`` line: a chain and the match and target that follow it."""

    chain: str
    spec: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join(("-A", self.chain, *self.spec))


def build_rules(options: InterceptionOptions) -> tuple[Rule, ...]:
    """The rules for ``options``, in the order they are appended."""
    rules: list[Rule] = []
    if options.include_inbound_ports != ():
        rules.append(Rule("PREROUTING", ("-p", "tcp", "-j", INBOUND)))
        rules.extend(_inbound_rules(options))
        rules.append(Rule(IN_REDIRECT, _redirect_to(options.inbound_port)))
    if options.include_outbound_cidrs != () and options.include_outbound_ports != ():
        rules.append(Rule("OUTPUT", ("-p", "tcp", "-j", OUTPUT)))
        rules.extend(_outbound_rules(options))
        rules.append(Rule(REDIRECT, _redirect_to(options.outbound_port)))
    return tuple(rules)


def _redirect_to(port: int) -> tuple[str, ...]:
    return ("-p", "tcp", "-j", "REDIRECT", "--to-ports", str(port))


def _inbound_rules(options: InterceptionOptions) -> Iterable[Rule]:
    for port in options.exclude_inbound_ports:
        yield Rule(INBOUND, ("-p", "tcp", "--dport", str(port), "-j", "RETURN"))
    if options.include_inbound_ports is None:
        yield Rule(INBOUND, ("-p", "tcp", "-j", IN_REDIRECT))
        return
    for port in options.include_inbound_ports:
        yield Rule(INBOUND, ("-p", "tcp", "--dport", str(port), "-j", IN_REDIRECT))


def _outbound_rules(options: InterceptionOptions) -> Iterable[Rule]:
    # The sidecar's own connections first: they must never come back to it.
    if options.proxy_uid is not None:
        yield Rule(OUTPUT, ("-m", "owner", "--uid-owner", str(options.proxy_uid), "-j", "RETURN"))
    if options.proxy_gid is not None:
        yield Rule(OUTPUT, ("-m", "owner", "--gid-owner", str(options.proxy_gid), "-j", "RETURN"))
    # Loopback: the app talking to itself, to the sidecar's own ports, or to a local agent.
    yield Rule(OUTPUT, ("-o", "lo", "-j", "RETURN"))
    yield Rule(OUTPUT, ("-d", "127.0.0.0/8", "-j", "RETURN"))
    for port in options.exclude_outbound_ports:
        yield Rule(OUTPUT, ("-p", "tcp", "--dport", str(port), "-j", "RETURN"))
    for network in options.exclude_outbound_cidrs:
        yield Rule(OUTPUT, ("-d", str(network), "-j", "RETURN"))
    cidrs: Sequence[ipaddress.IPv4Network | None] = (
        (None,) if options.include_outbound_cidrs is None else options.include_outbound_cidrs
    )
    ports: Sequence[int | None] = (
        (None,) if options.include_outbound_ports is None else options.include_outbound_ports
    )
    for include_network in cidrs:
        for include_port in ports:
            spec = ["-p", "tcp"]
            if include_network is not None and include_network.prefixlen > 0:
                spec += ["-d", str(include_network)]
            if include_port is not None:
                spec += ["--dport", str(include_port)]
            yield Rule(OUTPUT, (*spec, "-j", REDIRECT))


# ---------------------------------------------------------------- iptables-restore scripts


def _ours(saved_nat: str) -> tuple[list[str], list[str]]:
    """From ``iptables-save -t nat`` output: our chains, and the hook lines that jump to them."""
    chains: list[str] = []
    jumps: list[str] = []
    for line in saved_nat.splitlines():
        if line.startswith(f":{CHAIN_PREFIX}"):
            chains.append(line[1:].split()[0])
            continue
        words = line.split()
        if len(words) < 2 or words[0] != "-A" or words[1] not in HOOKS:
            continue
        for flag, target in itertools.pairwise(words):
            if flag in ("-j", "--jump", "-g", "--goto") and target.startswith(CHAIN_PREFIX):
                jumps.append(line)
                break
    return chains, jumps


def install_script(options: InterceptionOptions, saved_nat: str = "") -> str:
    """An ``iptables-restore --noflush`` script that puts exactly ``options``' rules in force.

    ``saved_nat`` is the current ``iptables-save -t nat``: jumps a previous run left in the
    built-in chains are deleted in the same transaction, and declaring our chains flushes
    them, so running it twice leaves one copy of each rule.
    """
    _, old_jumps = _ours(saved_nat)
    lines = ["*nat"]
    lines += [f":{chain} - [0:0]" for chain in CHAINS]
    lines += ["-D" + line[2:] for line in old_jumps]
    lines += [str(rule) for rule in build_rules(options)]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def clean_script(saved_nat: str) -> str | None:
    """A script that removes our jumps and chains, and nothing else; None when there are none."""
    chains, jumps = _ours(saved_nat)
    if not chains and not jumps:
        return None
    lines = ["*nat"]
    lines += ["-D" + line[2:] for line in jumps]
    # Flush every chain before deleting any: ours jump to each other.
    lines += [f"-F {chain}" for chain in chains]
    lines += [f"-X {chain}" for chain in chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- running the commands


@dataclass(frozen=True, slots=True)
class Commands:
    """The programs to run; ``iptables-legacy-save`` and ``-restore`` on legacy hosts."""

    save: str = "iptables-save"
    restore: str = "iptables-restore"
    timeout: float = 30.0


def _run(argv: list[str], stdin: str | None, timeout: float) -> str:
    try:
        done = subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InterceptionError(f"{' '.join(argv)}: {exc}") from exc
    if done.returncode != 0:
        raise InterceptionError(
            f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()}"
        )
    return done.stdout


def saved_nat(commands: Commands) -> str:
    return _run([commands.save, "-t", "nat"], None, commands.timeout)


def apply(options: InterceptionOptions, commands: Commands = Commands()) -> str:
    """Install the rules (replacing ours from an earlier run); returns the script it ran."""
    script = install_script(options, saved_nat(commands))
    _run([commands.restore, "--noflush"], script, commands.timeout)
    return script


def clean(commands: Commands = Commands()) -> str | None:
    """Remove our rules and chains; returns the script it ran, or None if there was nothing."""
    script = clean_script(saved_nat(commands))
    if script is not None:
        _run([commands.restore, "--noflush"], script, commands.timeout)
    return script


# ---------------------------------------------------------------- the command line


def parse_ports(text: str, *, allow_all: bool = True) -> tuple[int, ...] | None:
    """``"15000,15090"`` as a tuple; ``"*"`` (every port) as None; ``""`` as ``()``."""
    text = text.strip()
    if text == "*":
        if not allow_all:
            raise ValueError("'*' is not allowed here")
        return None
    ports: list[int] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if not item.isdigit() or not 0 < int(item) < 65536:
            raise ValueError(f"{item!r} is not a port (1-65535)")
        ports.append(int(item))
    return tuple(ports)


def parse_cidrs(text: str, *, allow_all: bool = True) -> tuple[ipaddress.IPv4Network, ...] | None:
    """``"10.0.0.0/8,192.168.1.1"`` as networks; ``"*"`` (everywhere) as None; ``""`` as ``()``."""
    text = text.strip()
    if text == "*":
        if not allow_all:
            raise ValueError("'*' is not allowed here")
        return None
    networks: list[ipaddress.IPv4Network] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.IPv4Network(item))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an IPv4 CIDR: {exc}") from None
    return tuple(networks)


def options_from_args(args: argparse.Namespace) -> InterceptionOptions:
    return InterceptionOptions(
        inbound_port=args.inbound_port,
        outbound_port=args.outbound_port,
        proxy_uid=None if args.proxy_uid == "" else int(args.proxy_uid),
        proxy_gid=None if args.proxy_gid == "" else int(args.proxy_gid),
        include_inbound_ports=parse_ports(args.inbound_ports),
        exclude_inbound_ports=parse_ports(args.exclude_inbound_ports, allow_all=False) or (),
        include_outbound_cidrs=parse_cidrs(args.outbound_cidrs),
        exclude_outbound_cidrs=parse_cidrs(args.exclude_outbound_cidrs, allow_all=False) or (),
        include_outbound_ports=parse_ports(args.outbound_ports),
        exclude_outbound_ports=parse_ports(args.exclude_outbound_ports, allow_all=False) or (),
    )


def run_iptables(args: argparse.Namespace) -> int:
    """``pilotfish iptables [apply|clean|show]``."""
    commands = Commands(save=args.iptables_save, restore=args.iptables_restore)
    try:
        if args.action == "clean":
            script = clean(commands)
            print(script if script is not None else "# no pilotfish rules to remove\n", end="")
            return 0
        options = options_from_args(args)
        if args.action == "show":
            print(install_script(options), end="")
            return 0
        print(apply(options, commands), end="")
        return 0
    except ValueError as exc:
        print(f"pilotfish iptables: {exc}", file=sys.stderr)
        return 2
    except InterceptionError as exc:
        print(f"pilotfish iptables: {exc}", file=sys.stderr)
        return 1
