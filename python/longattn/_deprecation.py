"""Deprecation paths of the public API (docs/api/conventions.md): renamed keywords and options
that used to be positional. Every deprecated spelling keeps working for one release and emits a
``DeprecationWarning`` pointing at the caller."""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class _Deprecated:
    """Default of a deprecated keyword alias: tells "not passed" apart from every real value
    (None included)."""

    _instance: _Deprecated | None = None

    def __new__(cls) -> _Deprecated:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<deprecated>"

    def __reduce__(self):
        return (_Deprecated, ())


#: The default of every deprecated keyword alias (``rope_base=DEPRECATED``).
DEPRECATED: Any = _Deprecated()


def warn(message: str, stacklevel: int = 3) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel)


def renamed(
    where: str,
    old: str,
    old_value: Any,
    new: str,
    new_value: Any,
    new_default: Any,
    stacklevel: int = 4,
) -> Any:
    """The value of keyword ``new`` when its old spelling ``old`` may have been passed instead:
    ``old_value`` (with a DeprecationWarning) when it was, else ``new_value``. Passing both, with
    ``new`` away from its default, is a TypeError."""
    if old_value is DEPRECATED:
        return new_value
    if new_value is not new_default and new_value != new_default:
        raise TypeError(f"{where}: got both {new}= and its deprecated alias {old}=; pass {new}=")
    warn(
        f"{where}: {old}= is deprecated and will be removed in the next release; pass {new}=",
        stacklevel,
    )
    return old_value


def keyword_only_options(fn: F) -> F:
    """Makes the options of ``fn`` (its keyword-only parameters) keyword-only for new callers
    while calls that still pass them positionally, in the old order, keep working with a
    DeprecationWarning. ``inspect.signature`` of the result is ``fn``'s (keyword-only)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    npos = sum(p.kind in kinds for p in params)
    options = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if len(args) > npos:
            extra = args[npos:]
            if len(extra) > len(options):
                raise TypeError(
                    f"{fn.__name__}() takes {npos} positional arguments but {len(args)} were given"
                )
            names = options[: len(extra)]
            for name, value in zip(names, extra, strict=True):
                if name in kwargs:
                    raise TypeError(f"{fn.__name__}() got multiple values for argument {name!r}")
                kwargs[name] = value
            spelled = ", ".join(f"{n}=" for n in names)
            warn(
                f"{fn.__name__}: passing {', '.join(names)} positionally is deprecated and will "
                f"be an error in the next release; pass {spelled} as keywords",
                stacklevel=3,
            )
            args = args[:npos]
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
