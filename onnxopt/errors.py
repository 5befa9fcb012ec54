"""Error types and the exit codes the CLI maps them to.

Every mistake a user can make is raised as :class:`UserInputError` with a *cause*
and a *fix*; the CLI prints them as one line and exits with code 2.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_VALIDATION_FAILED = 3


class OnnxoptError(Exception):
    """Base class of every error onnxopt raises on purpose."""

    exit_code = EXIT_INTERNAL

    def one_line(self) -> str:
        return " ".join(str(self).split())


class UserInputError(OnnxoptError):
    """Bad input or usage: names the cause and how to fix it (exit code 2)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, cause: str, fix: str | None = None):
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause} Fix: {fix}" if fix else cause)


class ValidationFailed(OnnxoptError):
    """The candidate model missed a tolerance (exit code 3)."""

    exit_code = EXIT_VALIDATION_FAILED


class VerificationError(ValidationFailed):
    """``--verify-each`` found the first pass that changed outputs beyond tolerance."""

    def __init__(self, pass_name: str, detail: str):
        self.pass_name = pass_name
        self.detail = detail
        super().__init__(f"pass '{pass_name}' changed the model's outputs beyond tolerance: {detail}")


class PassFailed(OnnxoptError):
    """A pass raised an unexpected exception (an onnxopt bug, exit code 1)."""

    def __init__(self, pass_name: str, cause: BaseException):
        self.pass_name = pass_name
        self.cause = cause
        super().__init__(f"internal error in pass '{pass_name}': {type(cause).__name__}: {cause}")
