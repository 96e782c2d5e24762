"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class KnnflowError(Exception):
    """A problem with the user's input or files, described in one line."""


class InputError(KnnflowError, ValueError):
    """A bad argument: t outside [0, 1), a shape that does not match the data, and so on."""


class MissingFileError(KnnflowError, FileNotFoundError):
    """A file the user must provide is not where knnflow expected it."""


class IndexMismatchError(KnnflowError):
    """An index folder whose manifest does not match its files or this version of knnflow."""


class _NamesOptions:
    """A message template naming options by their Python names (see OptionError)."""

    def __init__(self, template: str, *options: str):
        if options and not any("{" + name + "}" in template for name in options):
            template = "{" + options[0] + "} " + template
        self.template, self.options = template, options
        super().__init__(self.render(lambda name: name))

    def render(self, spell) -> str:
        """The message with each option spelled by spell(name)."""
        text = self.template
        for name in self.options:
            text = text.replace("{" + name + "}", spell(name))
        return text


class OptionError(_NamesOptions, InputError):
    """A bad value of a named option (or of several named together).

    The message is a template in which "{name}" stands for each option's Python name, e.g.
    OptionError("{batch_size} must be at least 1, got 0", "batch_size"); a template without
    any placeholder reads as "<first option> <template>". str() names the options as a library
    caller passes them (batch_size); `render` lets the command line name its flags instead
    (--batch-size), so flag names live in cli/ only.
    """


class OptionWarning(_NamesOptions, UserWarning):
    """A warning about a named option's value, spelled as OptionError's messages are."""
