"""Yak: extend Llama-2-family language models to Tibetan (or another low-resource script).

One module per stage of the pipeline, data flowing one way:
tokenizer -> data / sft -> modeling -> training -> merge / gguf -> generation / server / evaluation.
"""

__version__ = "0.1.0"


class YakError(Exception):
    """A problem with the user's input or files.

    Scripts print its message (which says what is wrong and how to fix it) and exit with status 2,
    without a traceback. Raise it for anything the user can fix; use ``assert`` only for internal invariants.
    """
