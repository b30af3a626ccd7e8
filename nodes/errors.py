"""The error type of the pack, in the lowest room so that every module can raise it without import circles."""


class ActError(ValueError):
    """A problem the user can fix in the graph; the message says which node and input."""


# ComfyUI reports an error's type as module + class name; the module path of a custom node is the long
# file-system path of the pack, so name it as users know it.
ActError.__module__ = "ComfyUI-ACT"
