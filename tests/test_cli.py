"""cli.py: the shared argument parser's one-line errors, the one-line report of an expected error,
and the stop signals of a long run."""

import signal

import pytest

import cli


def test_the_shared_parser_errors_in_one_line(capsys):
    p = cli.ArgumentParser(prog="x.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("go").add_argument("--n", type=int)
    for argv in ([], ["stop"], ["go", "--n", "many"]):
        with pytest.raises(SystemExit) as exc:
            p.parse_args(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert "(see x.py" in err and err.rstrip().endswith(" --help)"), err  # the sub-command's help


def test_first_line_says_what_went_wrong_in_one_line():
    assert cli.first_line(ValueError("bad flag\n  detail: the whole file")) == "bad flag"
    assert cli.first_line(KeyError()) == "KeyError"  # an empty message: the error's type
    assert cli.first_line("\n  after a blank line\nmore") == "after a blank line"
    assert cli.first_line("a very long message", limit=6) == "a very"


def test_usage_error_prints_one_line_and_returns_the_status(capsys):
    assert cli.usage_error(FileNotFoundError("no such file: x.tar\ntraceback-ish")) == 2
    assert capsys.readouterr().err == "error: no such file: x.tar\n"
    assert cli.usage_error("the run cannot go on", status=1) == 1
    assert capsys.readouterr().err == "error: the run cannot go on\n"


def test_stop_signals_ask_once_then_act_on_the_second():
    """The first SIGTERM or Ctrl-C is recorded (the run decides when to stop); a second Ctrl-C
    interrupts at once, and a second SIGTERM is the same request again (SLURM and systemd signal
    every process, and torchrun passes on its own: a rank gets two)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop = cli.StopSignals().install()
        assert stop.received is None
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == stop._handle  # not the default, which would end the process
        signal.raise_signal(signal.SIGTERM)
        assert stop.received == signal.SIGTERM
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
