"""The exceptions the pack raises on purpose.

Every message names what is wrong and what to change. Nodes wrap these with the node and input name; the
headless runner turns them into one line on the terminal and a non-zero exit code.
"""


class SoraError(Exception):
    """Base class for errors caused by input the user can fix (files, sizes, graphs)."""


class CheckpointError(SoraError, ValueError):
    """A model file that cannot be used: missing, truncated, corrupt, the wrong kind, or an unsupported family."""


class InputError(SoraError, ValueError):
    """A value that cannot work: an impossible size, a frame count off the 1+4k grid, mismatched channels."""


class Interrupted(SoraError):
    """The run was cancelled (ComfyUI's interrupt, Ctrl-C) between two steps."""
