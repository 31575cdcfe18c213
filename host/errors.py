"""The two ways a ground tool stops short, mapped to exit codes by host/cli.py."""


class BadInput(Exception):
    """Input the user can fix (exit 2). Say which file or parameter, and what is wrong."""


class ProtocolAborted(Exception):
    """A protocol stopped by design (exit 3): a check failed, no key was written."""
