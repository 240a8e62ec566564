class UserError(Exception):
    """A problem with the user's input (missing path, bad option): the CLI prints one line."""
