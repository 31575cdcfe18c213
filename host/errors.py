"""How a ground tool stops short, mapped to exit codes by host/cli.py:

  0  success
  1  the environment failed: disk full, a device or link gone, an internal error
  2  bad input the user can fix (the message names the file or option and what is wrong)
  3  a protocol stopped by design (the reason is in the report)
130  interrupted (Ctrl-C); outputs are left as they were before the run
"""

EXIT_OK = 0
EXIT_ENVIRONMENT = 1
EXIT_BAD_INPUT = 2
EXIT_ABORTED = 3
EXIT_INTERRUPTED = 130


class BadInput(Exception):
    """Input the user can fix (exit 2). Say which file or parameter, and what is wrong."""


class ProtocolAborted(Exception):
    """A protocol stopped by design (exit 3): a check failed, no key was written."""


class EnvironmentFailure(Exception):
    """The machine or a device failed (exit 1): disk full, link lost, port gone."""
