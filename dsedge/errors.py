"""Exception hierarchy. The CLI maps each class to a stable exit code (DESIGN.md §9)."""

from __future__ import annotations


class DsedgeError(Exception):
    """Base of every error dsedge raises on purpose.

    ``what`` says what failed, ``where`` names the file/tensor/layer, ``hint`` what to do.
    """

    exit_code = 1
    kind = "error"

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        self.what = what
        self.where = where
        self.hint = hint
        super().__init__(self.message)

    @property
    def message(self) -> str:
        text = self.what
        if self.where:
            text = f"{text} [{self.where}]"
        if self.hint:
            text = f"{text}\n  hint: {self.hint}"
        return text

    def to_json(self) -> dict:
        return {"type": type(self).__name__, "kind": self.kind, "message": self.what,
                "where": self.where, "hint": self.hint, "exit_code": self.exit_code}


class UserError(DsedgeError):
    """Bad input from the user: a file, a config, an argument. Exit code 3."""

    exit_code = 3
    kind = "bad_input"


class CheckpointError(UserError):
    """A checkpoint directory is missing files, corrupt, or does not match its config."""


class ConfigError(UserError):
    """A config.json (or target file) is invalid or describes an unsupported model."""


class UsageError(DsedgeError):
    """The command line does not parse (unknown flag, missing argument): argparse's complaint. Exit code 2."""

    exit_code = 2
    kind = "usage"


class CheckFailed(DsedgeError):
    """A quality or resource check failed (tolerance, budget, recall). Exit code 4."""

    exit_code = 4
    kind = "check_failed"


class UnitsFailed(DsedgeError):
    """Every unit of a command failed (e.g. every turn of a chat): the command's ``failure``, exiting with the
    first failure's code (dsedge.cli.all_units_failed)."""

    def __init__(self, errors: list[DsedgeError], unit: str):
        first = errors[0]
        super().__init__(f"every {unit} failed ({len(errors)}); the first: {first.what}", where=first.where,
                         hint=first.hint)
        self.errors = errors
        self.exit_code, self.kind = first.exit_code, first.kind

    def to_json(self) -> dict:
        return super().to_json() | {"failures": [e.to_json() for e in self.errors]}


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while a staged output was open (``dsedge.staging``): raised from the signal
    handler so that cleanup runs as it does for Ctrl-C. A BaseException, like KeyboardInterrupt, so that no
    ``except Exception`` swallows it. The CLI exits with ``128 + signum`` (143 for SIGTERM, 129 for SIGHUP)."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"terminated by {self.signal_name}")
