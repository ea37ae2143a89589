"""The exception hierarchy: one base class, one subclass per phase, each with a fixed exit code."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Problem:
    """One thing wrong with a recipe, with where it is and how to fix it.

    Attributes:
        message: What is wrong, in one sentence.
        file: The recipe file, if known.
        line: 1-based line in ``file``, if known.
        column: 1-based column in ``file``, if known.
        key_path: Where in the recipe, such as ``steps.merged.inputs[2]``.
        hint: How to fix it, or a did-you-mean.
    """

    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    key_path: str | None = None
    hint: str | None = None

    def location(self) -> str:
        """``file:line:col`` (as much of it as is known)."""
        parts = [p for p in (self.file, self.line, self.column) if p is not None]
        return ":".join(str(p) for p in parts)

    def __str__(self) -> str:
        loc = self.location()
        head = f"{loc}: " if loc else ""
        where = f"{self.key_path}: " if self.key_path else ""
        text = f"{head}{where}{self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class TvrecipeError(Exception):
    """Base of every error tvrecipe reports to a user (never a bug)."""

    exit_code = 1
    family = "error"


class RecipeError(TvrecipeError):
    """The recipe is invalid: syntax, schema, references, kinds, cycles. Nothing was read or written.

    Args:
        problems: Every problem found in the recipe, reported together.
    """

    exit_code = 2
    family = "recipe error"

    def __init__(self, problems: list[Problem] | Problem | str):
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        self.partial = None  # (valid part of the recipe, names of broken entries), if any
        super().__init__("\n".join(str(p) for p in self.problems))


class InputError(TvrecipeError):
    """A checkpoint or file the recipe names is missing, unreadable, corrupt or incompatible."""

    exit_code = 3
    family = "input error"


class OutputError(TvrecipeError):
    """An output cannot be written (exists, inside an input, disk full, permission)."""

    exit_code = 4
    family = "output error"


class ExecutionError(TvrecipeError):
    """A step failed while running (numerics, device, an op's own check)."""

    exit_code = 5
    family = "runtime error"


class VerifyError(TvrecipeError):
    """Outputs or inputs differ from the lock file."""

    exit_code = 6
    family = "verify error"


class MissingPackage(TvrecipeError):
    """An optional feature needs a package that is not installed (the message says which
    ``pip install`` adds it)."""

    exit_code = 7
    family = "missing package"


class Interrupted(TvrecipeError):
    """The run was interrupted (SIGINT / SIGTERM); temporary outputs were removed."""

    exit_code = 130
    family = "interrupted"


def about(exc: TvrecipeError, what: str) -> TvrecipeError:
    """The same error (family, exit code) with ``what: `` before its message, such as the
    model an input error is about: ``about(exc, "model 'ft' (s3://b/ft)")``."""
    return type(exc)(f"{what}: {exc}")


@dataclass
class Report:
    """Free-form per-step facts a run collects (cluster membership, ranks, ...)."""

    step: str
    op: str
    data: dict = field(default_factory=dict)
