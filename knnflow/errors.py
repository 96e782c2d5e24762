"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class KnnflowError(Exception):
    """A problem with the user's input or files, described in one line."""


class InputError(KnnflowError, ValueError):
    """A bad argument: t outside [0, 1), a shape that does not match the data, and so on."""


class MissingFileError(KnnflowError, FileNotFoundError):
    """A file the user must provide is not where knnflow expected it."""


class IndexMismatchError(KnnflowError):
    """An index folder whose manifest does not match its files or this version of knnflow."""
