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
        if not isinstance(err, QuietUserError):
            print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; what was saved before is intact", file=sys.stderr, flush=True)
        sys.exit(130)


class QuietUserError(UserError):
    """The same error on a process other than the main one, which has already said it."""
