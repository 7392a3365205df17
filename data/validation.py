"""Choices declared once, checked once, the same message everywhere (after scikit-learn's ``StrOptions``).

A setting that takes one of a few names (a head kind, a search mode, a precision) is checked by
`check_choice`, which returns the value or raises the one-line ``ValueError`` the command line prints::

    unknown head 'vmff'; choose one of: ce, hc, mvmf

`choose_one_of` is the tail of that message, for the few errors that say something other than "unknown"
(``no partition 'x' in these cells; choose one of: ...``).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

__all__ = ["check_choice", "choice_error", "choose_one_of"]


def choose_one_of(choices: Iterable[Any]) -> str:
    """``"choose one of: a, b, c"`` for ``choices`` in their given order."""
    return "choose one of: " + ", ".join(str(choice) for choice in choices)


def choice_error(
    name: str, value: Any, choices: Iterable[Any], *, source: Optional[object] = None
) -> ValueError:
    """The error for ``value`` not among ``choices``: ``"[source: ]unknown <name> <value!r>; choose one of: …"``.

    Args:
        name: what the value is (``"head"``, ``"search mode"``).
        value: the value given.
        choices: the valid values, in the order the message lists them.
        source: the file or setting the value was read from, named first when given.
    """
    prefix = f"{source}: " if source is not None else ""
    return ValueError(f"{prefix}unknown {name} {value!r}; {choose_one_of(choices)}")


def check_choice(name: str, value: Any, choices: Iterable[Any], *, source: Optional[object] = None) -> Any:
    """``value`` when it is one of ``choices``; otherwise raise `choice_error`'s ``ValueError``.

    Example:
        >>> check_choice("head", "ce", ("ce", "hc", "mvmf"))
        'ce'
    """
    choices = tuple(choices)
    if value not in choices:
        raise choice_error(name, value, choices, source=source)
    return value
