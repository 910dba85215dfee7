"""The CLI's command classes: usage errors in one line, and on/off flags without a value placeholder in --help."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperCommand, TyperGroup

# typer's UsageError: typer vendors click in recent releases, so the class is taken from typer, not from click.
UsageError = typer.BadParameter.__mro__[1]


def _flags_take_no_value(params: list) -> list:
    """A flag takes no value, so its help row shows no type (typer would print `<bool>`)."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    def get_params(self, ctx):
        return _flags_take_no_value(super().get_params(ctx))


class Group(TyperGroup):
    """`asyncvid`'s commands; a bad option or value is one `error:` line with exit code 2 (`--help` stays rich)."""

    def get_params(self, ctx):
        return _flags_take_no_value(super().get_params(ctx))

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError":  # `asyncvid` or a command alone: its help
                typer.echo(err.ctx.get_help())
                code = 2
            else:
                where = err.ctx.command_path if err.ctx is not None else "asyncvid"
                typer.echo(f"error: {_with_value(err, sys.argv[1:] if args is None else args)} (see `{where} "
                           f"--help`)", err=True)
                code = 2
        if not standalone_mode:
            return code
        sys.exit(code if isinstance(code, int) else 0)


def _with_value(err, args) -> str:
    """The error's message, naming the value given when the message does not (typer's type errors do not)."""
    message = err.format_message().replace("Value error, ", "")  # pydantic's prefix, inside typer's message
    param = getattr(err, "param", None)
    names = getattr(param, "opts", None) or []
    given = None
    for i, arg in enumerate(args):
        name, _, inline = str(arg).partition("=")
        if name in names:
            given = inline or (str(args[i + 1]) if i + 1 < len(args) else None)
    if given is None or f"'{given}'" in message:
        return message
    return f"{message.rstrip('.')}; got '{given}'"
