"""What the command-line tests check of a refusal: exit status 2 and one line on stderr."""


def one_line(status, err, command: str) -> str:
    """The one line a refused ``compiledopt COMMAND`` printed (exit status 2, no traceback)."""
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"compiledopt {command}: "), err
    return lines[0]
