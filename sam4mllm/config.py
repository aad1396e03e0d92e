"""Objects from Hydra config nodes, with the errors a user acts on kept readable."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate


def build(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, except that missing files and bad values surface as themselves.

    Hydra wraps whatever a target raises in an ``InstantiationException`` whose message is
    the ``repr`` of the original, so "expected this file, in this layout; run this command"
    arrives as one line of ``\\n`` escapes. File and value errors are the ones that say what
    to download or fix, so they are re-raised unchanged (traceback included); anything else
    (a misspelt config key, say) keeps Hydra's message, whose ``full_key`` names the entry.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while isinstance(cause, InstantiationException):
            cause = cause.__cause__
        if isinstance(cause, OSError | ValueError):
            raise cause from None
        raise
