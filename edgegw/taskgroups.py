"""Nursery exceptions, unwrapped.

Trio nurseries raise ExceptionGroups.  A connection handler wants the one exception that
says why the connection ended (a protocol fault, a closed socket), not the group.
"""

from __future__ import annotations


def first_of(group: BaseExceptionGroup, *types: type[BaseException]) -> BaseException | None:
    """The first exception in ``group`` (searched depth-first) that is one of ``types``,
    trying the types in the order given."""
    for tp in types:
        match: BaseException | None = group.subgroup(
            lambda e, tp=tp: isinstance(e, tp))  # type: ignore[misc]
        while isinstance(match, BaseExceptionGroup):
            match = match.exceptions[0]
        if match is not None:
            return match
    return None


def reraise_meaningful(group: BaseExceptionGroup, *types: type[BaseException]) -> None:
    """Raise the first exception of ``types`` found in ``group``, else the group itself."""
    exc = first_of(group, *types)
    if exc is not None:
        raise exc from None
    raise group


__all__ = ["first_of", "reraise_meaningful"]
