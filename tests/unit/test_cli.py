"""The command line: --version, defaults in help, suggestions for misspelled names."""

from __future__ import annotations

import pytest

from pilotfish import __version__
from pilotfish.cli import build_parser, main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"pilotfish {__version__}"


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        ("sidecar", "(default: 127.0.0.1:15001)"),
        ("sidecar", "verbosity (default: info)"),
        ("control-plane", "xDS gRPC port (default: 15010)"),
        ("demo", "the four phases (default: 16.0)"),
        ("top", "seconds between scrapes (default: 2.0)"),
        ("status", "(default: 127.0.0.1:15010)"),
    ],
)
def test_help_shows_defaults(
    command: str, shown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert shown in help_text
    assert "(default: None)" not in help_text


def test_a_misspelled_flag_gets_a_suggestion_and_the_subcommand_usage(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["sidecar", "--confg", "x.yaml"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pilotfish sidecar ")
    assert "unrecognized arguments: --confg x.yaml" in err
    assert "--confg: did you mean --config?" in err


def test_a_misspelled_flag_with_a_value(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["control-plane", "--config", "m.yaml", "--prot=1"])
    err = capsys.readouterr().err
    assert err.startswith("usage: pilotfish control-plane ")
    assert "--prot: did you mean --port?" in err


def test_a_misspelled_subcommand_and_choice(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["validat", "m.yaml"])
    assert "invalid choice: 'validat' (did you mean 'validate'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sidecar", "--log-level", "warn"])
    err = capsys.readouterr().err
    assert err.startswith("usage: pilotfish sidecar ")
    assert "invalid choice: 'warn' (did you mean 'warning'?)" in err


def test_nothing_close_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["zzz"])
    assert "choose from sidecar, control-plane" in capsys.readouterr().err


def test_valid_arguments_parse() -> None:
    args = build_parser().parse_args(["sidecar", "--xds", "127.0.0.1:15010", "--service", "a"])
    assert (args.xds, args.service, args.outbound_address) == ("127.0.0.1:15010", "a",
                                                               "127.0.0.1:15001")
