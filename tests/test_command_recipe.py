"""The CLI command recipe holds: a command is one module with ``add_parser`` and ``run`` plus one
line in the dispatch table, and it then gets the command line's behaviour — listed in the help,
its options parsed by the shared argparse types, a bad value refused in one line with status 2,
an application's ``ValueError`` reported in one line with status 2."""

import sys
import types

import pytest

from compiledopt import cli
from compiledopt.cli.arguments import positive_int


def _toy_module() -> types.ModuleType:
    module = types.ModuleType("compiledopt.cli.toy")

    def add_parser(commands):
        parser = commands.add_parser("toy", help="repeat a word")
        parser.add_argument("--times", type=positive_int, default=2)
        parser.add_argument("--word", default="hi")
        return parser

    def run(args, out):
        if args.word == "bad":  # what an application raises for a value it refuses
            raise ValueError(f"Invalid word: {args.word!r} (any other)")
        print(" ".join([args.word] * args.times), file=out)
        return 0

    module.add_parser, module.run = add_parser, run
    return module


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(sys.modules, "compiledopt.cli.toy", _toy_module())
    monkeypatch.setitem(cli.COMMANDS, "toy", "toy")
    return "toy"


def test_a_command_added_by_one_module_and_one_line_runs(toy, capsys):
    assert cli.main([toy, "--times", "3", "--word", "yo"]) == 0
    assert capsys.readouterr().out == "yo yo yo\n"
    assert "toy" in cli.build_parser().format_help()


def test_it_refuses_bad_values_in_one_line(toy, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([toy, "--times", "0"])
    assert exit_info.value.code == 2
    assert "argument --times: must be a positive integer, got 0" in capsys.readouterr().err
    assert cli.main([toy, "--word", "bad"]) == 2
    assert capsys.readouterr().err == "compiledopt toy: Invalid word: 'bad' (any other)\n"
