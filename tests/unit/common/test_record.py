"""smcommon.record: what the library's records rely on of @dataclass."""

from __future__ import annotations

import pytest
from smcommon.record import FrozenRecord, asdict, field, field_names, record, replace


@record(frozen=True)
class Chap:
    user: str
    secret: str = field(repr=False)
    port: int = 3260
    tags: tuple[str, ...] = ()


@record
class Report:
    name: str
    items: list[str] = field(default_factory=list)
    chap: Chap | None = None


def test_init_takes_fields_by_position_or_name_with_defaults() -> None:
    a = Chap("u", "s")
    assert (a.user, a.secret, a.port, a.tags) == ("u", "s", 3260, ())
    assert Chap(user="u", secret="s", port=1).port == 1
    with pytest.raises(TypeError):
        Chap("u")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Chap("u", "s", nope=1)  # type: ignore[call-arg]
    assert field_names(Chap) == ("user", "secret", "port", "tags") == Chap.__match_args__
    assert field_names(a) == field_names(Chap)


def test_a_default_factory_makes_a_new_value_per_record() -> None:
    a, b = Report("a"), Report("b")
    a.items.append("x")
    assert b.items == [] and Report("c", ["y"]).items == ["y"]


def test_repr_leaves_out_the_fields_marked_so() -> None:
    assert repr(Chap("u", "hunter2")) == "Chap(user='u', port=3260, tags=())"
    assert "hunter2" not in repr(Report("r", chap=Chap("u", "hunter2")))


def test_equality_is_by_class_and_fields_and_frozen_records_hash() -> None:
    assert Chap("u", "s") == Chap("u", "s") and Chap("u", "s") != Chap("u", "t")
    assert Chap("u", "s") != ("u", "s", 3260, ())
    assert len({Chap("u", "s"), Chap("u", "s")}) == 1
    assert Report("a") == Report("a")
    with pytest.raises(TypeError):
        hash(Report("a"))  # mutable records compare by value: not hashable


def test_a_frozen_record_refuses_changes() -> None:
    a = Chap("u", "s")
    with pytest.raises(FrozenRecord):
        a.user = "v"  # type: ignore[misc]
    with pytest.raises(AttributeError):  # FrozenRecord is an AttributeError, as with dataclasses
        del a.user
    r = Report("a")
    r.name = "b"
    assert r.name == "b"


def test_replace_makes_a_new_record_and_refuses_unknown_fields() -> None:
    a = Chap("u", "s")
    b = replace(a, port=1)
    assert (a.port, b.port, b.user, b.secret) == (3260, 1, "u", "s")
    with pytest.raises(TypeError, match="no field nope"):
        replace(a, nope=1)


def test_asdict_copies_nested_records_and_containers() -> None:
    r = Report("a", ["x"], Chap("u", "s", tags=("t",)))
    d = asdict(r)
    assert d == {"name": "a", "items": ["x"], "chap": {"user": "u", "secret": "s", "port": 3260, "tags": ("t",)}}
    d["items"].append("y")
    assert r.items == ["x"]


def test_a_class_body_keeps_what_it_defines() -> None:
    @record(frozen=True)
    class Named:
        name: str

        def __repr__(self) -> str:
            return f"<{self.name}>"

    assert repr(Named("n")) == "<n>"
    assert Named("n") == Named("n") != Named("m") and hash(Named("n")) == hash(Named("n"))

    @record
    class Empty:
        pass

    assert Empty() == Empty() and repr(Empty()).endswith(".Empty()")


def test_field_order_and_reserved_names_are_checked() -> None:
    with pytest.raises(TypeError, match="without a default follows"):

        @record
        class Bad:
            a: int = 1
            b: int  # type: ignore[misc]

    with pytest.raises(TypeError, match="may not be named"):

        @record
        class Reserved:
            _r_d: int

    with pytest.raises(ValueError):
        field(default=1, default_factory=list)
