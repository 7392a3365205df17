import pytest

from geoswc import __version__
from geoswc.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"geoswc {__version__}"


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("cells", "data", "train", "index", "score", "evaluate", "tag", "fit", "demo"):
        assert command in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: geoswc" in capsys.readouterr().out


def test_a_refused_system_call_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    import errno

    from geoswc.commands import score

    def full_disk(path, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(score, "read_locations", full_disk)
    assert main(["score", str(tmp_path / "pred.csv"), str(tmp_path / "truth.csv")]) == 1
    err = capsys.readouterr().err
    assert err == f"geoswc score: error: No space left on device: {tmp_path / 'truth.csv'}\n"


def test_help_loads_no_command_module_and_no_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from geoswc.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('geoswc.commands.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_listing_names_each_command_as_its_parser_does():
    from geoswc.cli import COMMANDS, build_parser

    parser = build_parser()
    actions = next(a for a in parser._subparsers._group_actions)
    helps = {choice.dest: choice.help for choice in actions._choices_actions}
    assert helps == {name: help_text for name, (_, help_text) in COMMANDS.items()}
