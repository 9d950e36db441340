"""Typed records: classes whose annotated names are their fields.

``@record`` (or ``@record(frozen=True)``) gives a class what
``@dataclasses.dataclass`` gives it: an ``__init__`` taking the fields in
order, by position or by name, with defaults from the class body or
``field(default_factory=...)``; ``__repr__`` (less the fields marked
``field(repr=False)``, secrets); ``__eq__`` between records of one class;
``__match_args__``; and, when frozen, ``__hash__`` and no assignment
(``FrozenRecord``).  ``replace``, ``asdict`` and ``field_names`` are the helpers.

Why not dataclasses: a plugin is a process per call, and its start-up is
most of a short call.  ``import dataclasses`` costs about 6 ms (it imports
``inspect``, ``ast`` and ``dis``) and each class about 0.7 ms (it compiles
five methods); here one ``__init__`` is compiled per class (about 0.07 ms),
and the other methods are shared.
"""

from __future__ import annotations

from operator import attrgetter

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar, dataclass_transform

    T = TypeVar("T")
else:

    def dataclass_transform(**_kw):
        return lambda f: f


_MISSING = object()
# the prefix of the generated __init__'s own names (_r_self, _r_d ...); no field may take it
_RESERVED = "_r_"


class FrozenRecord(AttributeError):
    """An assignment to a field of a frozen record."""


class Field:
    """What ``field(...)`` says of a field beyond its annotation."""

    __slots__ = ("default", "default_factory", "repr")

    def __init__(self, default: object, default_factory: object, repr: bool) -> None:
        self.default = default
        self.default_factory = default_factory
        self.repr = repr


def field(*, default: Any = _MISSING, default_factory: Any = _MISSING, repr: bool = True) -> Any:
    """A field's default value or factory, and whether ``repr`` shows it."""
    if default is not _MISSING and default_factory is not _MISSING:
        raise ValueError("a field has a default or a default_factory, not both")
    return Field(default, default_factory, repr)


@dataclass_transform(field_specifiers=(field,))
def record(cls: Any = None, /, *, frozen: bool = False) -> Any:
    """Make ``cls`` a record (``@record`` or ``@record(frozen=True)``)."""

    def make(c: type[T]) -> type[T]:
        return _make(c, frozen)

    return make if cls is None else make(cls)


def field_names(cls_or_record: Any) -> tuple[str, ...]:
    """The field names of a record class or record, in order."""
    return cls_or_record._record_fields  # type: ignore[no-any-return]


def replace(rec: T, /, **changes: Any) -> T:
    """A new record of ``rec``'s class: its fields, less ``changes``."""
    fields = field_names(rec)
    unknown = changes.keys() - set(fields)
    if unknown:
        raise TypeError(f"{type(rec).__qualname__} has no field {', '.join(sorted(unknown))}")
    values = {n: getattr(rec, n) for n in fields}
    values.update(changes)
    return type(rec)(**values)


def asdict(rec: Any) -> dict[str, Any]:
    """``rec``'s fields as a dict; records, lists, tuples and dicts within are copied."""
    return {n: _plain(getattr(rec, n)) for n in field_names(rec)}


def _plain(value: Any) -> Any:
    if hasattr(type(value), "_record_fields"):
        return asdict(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    return value


def _make(cls: Any, frozen: bool) -> Any:
    fields: list[str] = []
    hidden: set[str] = set()
    params: list[str] = []
    lines: list[str] = []
    env: dict[str, object] = {"_r_missing": _MISSING}  # the names the __init__ sees
    defaulted = False
    # the class's own annotations, as strings (``from __future__ import annotations``);
    # inspect.get_annotations would import inspect, which this module is here to avoid
    for n, kind in cls.__dict__.get("__annotations__", {}).items():  # noqa: RUF063
        if isinstance(kind, str) and kind.startswith(("ClassVar", "typing.ClassVar")):
            continue
        if n.startswith(_RESERVED):
            raise TypeError(f"{cls.__qualname__}: a record field may not be named {n!r}")
        default = spec = cls.__dict__.get(n, _MISSING)
        factory = _MISSING
        if isinstance(spec, Field):
            if not spec.repr:
                hidden.add(n)
            default, factory = spec.default, spec.default_factory
            if default is _MISSING:
                delattr(cls, n)
            else:
                setattr(cls, n, default)
        value = n
        if factory is not _MISSING:
            env[f"_r_f_{n}"] = factory
            params.append(f"{n}=_r_missing")
            value = f"_r_f_{n}() if {n} is _r_missing else {n}"
            defaulted = True
        elif default is not _MISSING:
            env[f"_r_d_{n}"] = default
            params.append(f"{n}=_r_d_{n}")
            defaulted = True
        elif defaulted:
            raise TypeError(f"{cls.__qualname__}: field {n!r} without a default follows one with a default")
        else:
            params.append(n)
        lines.append(f"    _r_d[{n!r}] = {value}\n")
        fields.append(n)
    src = f"def __init__(_r_self, {', '.join(params)}):\n    _r_d = _r_self.__dict__\n{''.join(lines)}"
    exec(src, env)  # noqa: S102 - the source is built above from the class's own field names
    init = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"  # type: ignore[attr-defined]
    cls.__init__ = init
    cls._record_fields = tuple(fields)
    cls._record_shown = tuple(n for n in fields if n not in hidden)
    # a staticmethod: the one- and no-field getters are functions, which a class would bind
    cls._record_values = staticmethod(attrgetter(*fields) if len(fields) > 1 else _one_or_none(fields))
    cls.__match_args__ = tuple(fields)  # type: ignore[misc]
    # what the class body defines itself stays, as with dataclasses
    own = cls.__dict__
    if "__repr__" not in own:
        cls.__repr__ = _repr
    if "__eq__" not in own:
        cls.__eq__ = _eq
    if own.get("__hash__") is None:  # absent, or set to None by a class body defining __eq__
        # compared by value: hashable by value when frozen, not at all when mutable
        cls.__hash__ = _hash if frozen else None
    if frozen:
        cls.__setattr__ = _refuse
        cls.__delattr__ = _refuse
    return cls


def _one_or_none(fields: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    if not fields:
        return lambda _rec: ()
    get = attrgetter(fields[0])
    return lambda rec: (get(rec),)


def _repr(self: Any) -> str:
    shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._record_shown)
    return f"{type(self).__qualname__}({shown})"


def _eq(self: Any, other: object) -> bool:
    values = self._record_values
    if other.__class__ is not self.__class__:
        return NotImplemented
    return values(self) == values(other)  # type: ignore[no-any-return]


def _hash(self: Any) -> int:
    return hash(self._record_values(self))


def _refuse(self: Any, name: str, *_value: object) -> None:
    raise FrozenRecord(f"{type(self).__qualname__} is frozen: cannot change {name!r}")
