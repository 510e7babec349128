"""One error hierarchy, each class with the exit code the CLI ends with.

    FlotillaError           1   something Flotilla could not do
    ├── UserError           2   bad input: the message names the field or file and what to do
    ├── RunFailure          1   the run failed (the app's error, a dead SuperLink, too few devices)
    └── StoppedError      130   stopped by Ctrl-C / SIGTERM / `flotilla stop`

Messages are one line. The CLI prints them and exits with `exit_code`
(flotilla.cli.main), in one place; nothing else turns an error into an exit.
"""

from __future__ import annotations


class FlotillaError(Exception):
    exit_code = 1


class UserError(FlotillaError, ValueError):
    """Bad input, found before anything starts."""

    exit_code = 2


class RunFailure(FlotillaError, RuntimeError):
    exit_code = 1


class StoppedError(FlotillaError):
    exit_code = 130


# "refused": the run was stopped before round 1 because the job cannot work as written (e.g. memory_check)
EXIT_CODES = {"completed": 0, "failed": RunFailure.exit_code, "stopped": StoppedError.exit_code,
              "refused": UserError.exit_code}
