"""User-facing errors: one clear line, a non-zero exit, never a bare traceback."""
import sys


class UserError(ValueError):
    """A mistake the user can fix (path, column, flag, type, checkpoint).

    The message is one line that says what is wrong and what to do next.
    """


def exit_on_user_error(fn, *args, **kwargs):
    """Run `fn`; turn a `UserError` into `error: <message>` on stderr and exit 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
