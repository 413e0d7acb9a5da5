"""Small helpers shared by the test files."""


def call_main(main, argv, capsys):
    """Run a script's main(argv) in process; returns (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err
