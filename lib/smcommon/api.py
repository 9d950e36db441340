"""The SMAPI as data: every method, its ordered inputs, its output, and the types.

This module owns the description of the storage interface (docs/api.md is generated from it) and
request validation.  ``METHODS`` maps a wire name (``"VDI.create"``) to a
``Method``; ``Method.validate(params)`` turns the single struct argument of a
request into the keyword arguments a driver method receives, or raises
``InvalidRequest`` naming the method and the argument.  ``Method`` is also how
a driver declares extra, non-SMAPI methods (``driver.extra_methods``).

Types (``Type``) are values, not classes, so they cost nothing to import:

    STRING, KEY      string; KEY is an object key (sr, vdi) checked by safe_name,
                     so it can never name a path outside its place
    INT64            int; accepts XML-RPC <i4>/<int>/<i8> and decimal strings
    BOOL             bool
    STRING_LIST      list of strings
    STRING_MAP       string -> string map (an XML-RPC struct)
    VDI_INFO, ATTACH_INFO, QUERY_RESULT   structs with typed fields and defaults
    VDI_INFO_LIST    list of vdi_info
    UNIT             no value (answered as <nil/>)
    ANY              anything XML-RPC can carry (for extra methods only)

Input structs may be partial: missing fields get their defaults (empty string,
False, 0, {}; ``persistent`` defaults to True).  Unknown fields are dropped:
toolstacks newer than this interface send more vdi_info fields (``sharable``,
``cbt_enabled`` ...), and refusing them would break every call they make.
The same conversion checks a driver's result before ``rpc`` marshals it; a
driver result that does not fit its declared type is a bug and is answered
``Backend_error INTERNAL_ERROR``.

Plain classes with ``__slots__`` (no dataclasses, no typing at run time): every
plugin call is a fresh process and imports this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from smcommon.errors import BackendError, InvalidRequest

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class UnknownMethod(InvalidRequest):
    """The method name is neither an SMAPI method nor one of the driver's."""

    code = "UNKNOWN_METHOD"
    msg = "unknown method {self.reason}"


class Type:
    """A wire type.  ``kind`` is one of string, key, int64, bool, list, map,
    struct, unit, any; ``item`` is a list's item type; ``fields`` a struct's."""

    __slots__ = ("description", "fields", "item", "kind", "name", "plan")

    def __init__(
        self,
        name: str,
        kind: str,
        description: str = "",
        *,
        item: Type | None = None,
        fields: Sequence[Field] = (),
    ) -> None:
        self.name = name
        self.kind = kind
        self.description = description
        self.item = item
        self.fields = {f.name: f for f in fields}
        # a struct's fields with the Python type a scalar one has as it is
        # (the fast path of convert: an SR.scan result holds 10,000 structs)
        self.plan = tuple((f.name, f, _EXACT.get(f.type.kind)) for f in fields)

    def __repr__(self) -> str:
        return f"Type({self.name})"

    def convert(self, value: object, where: str) -> object:
        """Check ``value`` against this type and return it in Python form.

        ``where`` names the value in error messages (``VDI.create: argument
        'vdi_info.virtual_size'``).  Raises InvalidRequest.
        """
        kind = self.kind
        if kind == "string":
            if isinstance(value, str):
                return value
            raise _mistyped(where, "a string", value)
        if kind == "key":
            if not isinstance(value, str):
                raise _mistyped(where, "a string", value)
            from smcommon.paths import safe_name

            return safe_name(where, value)
        if kind == "int64":
            return _int64(value, where)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            raise _mistyped(where, "a boolean", value)
        if kind == "list":
            if not isinstance(value, (list, tuple)):
                raise _mistyped(where, f"a list of {self.item.name}", value)  # type: ignore[union-attr]
            item = self.item
            assert item is not None
            try:  # the index is named only in the error (SR.scan results hold thousands)
                return [item.convert(v, where) for v in value]
            except InvalidRequest:
                return [item.convert(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if kind == "map":
            if not isinstance(value, dict):
                raise _mistyped(where, "a string->string map (struct)", value)
            for k, v in value.items():
                if not isinstance(k, str):
                    raise _mistyped(f"{where} key", "a string", k)
                if not isinstance(v, str):
                    # Never echo the value: map values carry secrets (CHAP
                    # passwords in device_config) and errors reach the log.
                    raise InvalidRequest(
                        f"{where}[{_short(k)}] must be a string, not {_type_name(v)}"
                    )
            return dict(value)
        if kind == "struct":
            if not isinstance(value, dict):
                raise _mistyped(where, f"a {self.name} struct", value)
            out: dict[str, object] = {}
            for name, f, exact in self.plan:
                if name in value:
                    v = value[name]
                    if type(v) is exact and (exact is not int or INT64_MIN <= v <= INT64_MAX):  # type: ignore[operator]
                        out[name] = v
                        continue
                    try:
                        out[name] = f.type.convert(v, where)
                    except InvalidRequest:  # again, naming the field
                        out[name] = f.type.convert(v, f"{where}.{name}")
                else:
                    out[name] = f.default_value()
            return out
        if kind == "unit":
            return None
        if kind == "any":
            return value
        raise AssertionError(f"unknown type kind {kind}")


class Field:
    """A struct field: name, type, description and default."""

    __slots__ = ("default", "description", "name", "type")

    def __init__(
        self, name: str, type: Type, description: str = "", default: object = None
    ) -> None:
        self.name = name
        self.type = type
        self.description = description
        self.default = default

    def default_value(self) -> object:
        if self.default is not None:
            return self.default
        factory = _DEFAULTS.get(self.type.kind)
        return factory() if factory is not None else None


_DEFAULTS = {
    "string": str,
    "key": str,
    "int64": int,
    "bool": bool,
    "map": dict,
    "list": list,
}


class Arg:
    """One named input of a method."""

    __slots__ = ("description", "name", "type")

    def __init__(self, name: str, type: Type, description: str = "") -> None:
        self.name = name
        self.type = type
        self.description = description


class Method:
    """One method: its wire name, ordered inputs, output type and description.

    ``dbg`` (debug_info) is always the first input; it is added when a driver
    declares an extra method without it.  ``attr`` is the driver attribute
    that implements the method: ``"VDI.create"`` -> ``vdi_create``.
    """

    __slots__ = ("description", "inputs", "name", "output", "output_name")
    name: str
    inputs: dict[str, Arg]
    output: Type
    description: str
    output_name: str

    def __init__(
        self,
        name: str,
        inputs: Sequence[Arg] = (),
        output: Type | None = None,
        description: str = "",
        output_name: str = "",
    ) -> None:
        args = list(inputs)
        if not args or args[0].name != "dbg":
            args.insert(0, Arg("dbg", DEBUG_INFO, "Debug context from the caller"))
        self.name = name
        self.inputs = {a.name: a for a in args}
        self.output = output if output is not None else UNIT
        self.description = description
        self.output_name = output_name

    def __repr__(self) -> str:
        return f"Method({self.name})"

    @property
    def attr(self) -> str:
        return self.name.lower().replace(".", "_")

    def validate(self, params: object) -> dict[str, object]:
        """The driver's keyword arguments for this request's struct argument."""
        if not isinstance(params, dict):
            raise InvalidRequest(
                f"{self.name} takes one struct argument holding "
                f"{', '.join(self.inputs)}; got {_type_name(params)}"
            )
        for k in params:
            if k not in self.inputs:
                raise InvalidRequest(
                    f"{self.name}: unexpected argument {_short(k)} "
                    f"(expected: {', '.join(self.inputs)})"
                )
        kwargs: dict[str, object] = {}
        for name, arg in self.inputs.items():
            if name not in params:
                raise InvalidRequest(f"{self.name}: missing argument {name!r}")
            kwargs[name] = arg.type.convert(
                params[name], f"{self.name}: argument {name}"
            )
        return kwargs

    def check_result(self, value: object) -> object:
        """A driver's result, checked against the output type (a bug if not)."""
        try:
            return self.output.convert(value, f"result of {self.name}")
        except InvalidRequest as e:
            raise BackendError(
                "INTERNAL_ERROR", [f"the driver returned an invalid value: {e.reason}"]
            ) from e


def _mistyped(where: str, expected: str, value: object) -> InvalidRequest:
    return InvalidRequest(
        f"{where} must be {expected}, not {_type_name(value)} {_short(value)}"
    )


def _type_name(value: object) -> str:
    return {
        bool: "boolean",
        int: "integer",
        float: "double",
        str: "string",
        bytes: "base64",
        list: "array",
        tuple: "array",
        dict: "struct",
        type(None): "nil",
    }.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_EXACT: dict[str, type] = {"string": str, "bool": bool, "int64": int}


def _int64(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise _mistyped(where, "an int64", value)
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        text = value.strip()
        digits = text[1:] if text[:1] in "+-" else text
        if (
            not digits
            or not digits.isascii()
            or not digits.isdigit()
            or len(digits) > 19
        ):
            raise _mistyped(where, "an int64 (an integer or a decimal string)", value)
        n = int(text)
    else:
        raise _mistyped(where, "an int64", value)
    if not INT64_MIN <= n <= INT64_MAX:
        raise InvalidRequest(f"{where} is out of the int64 range: {n}")
    return n


# --- types ------------------------------------------------------------------

STRING = Type("string", "string")
DEBUG_INFO = Type("debug_info", "string", "debug context from the caller")
KEY = Type("key", "key", "an object key (letters, digits, . _ : -; at most 128)")
INT64 = Type("int64", "int64")
BOOL = Type("bool", "bool")
UNIT = Type("unit", "unit")
ANY = Type("any", "any")
STRING_LIST = Type("string list", "list", item=STRING)
STRING_MAP = Type("string->string map", "map")

VDI_INFO = Type(
    "vdi_info",
    "struct",
    "all per-VDI properties",
    fields=[
        Field("vdi", STRING, "the unique id of this VDI"),
        Field(
            "content_id", STRING, "the id of the VDI's contents: same id, same bytes"
        ),
        Field("name_label", STRING, "human-readable name of the VDI"),
        Field("name_description", STRING, "human-readable description of the VDI"),
        Field("ty", STRING, "used by a toolstack to remember why a VDI was created"),
        Field(
            "metadata_of_pool", STRING, "for a pool metadata VDI, the pool reference"
        ),
        Field("is_a_snapshot", BOOL, "true if the VDI is a snapshot of another VDI"),
        Field("snapshot_time", STRING, "when the snapshot was created"),
        Field("snapshot_of", STRING, "the VDI this is a snapshot of"),
        Field("read_only", BOOL, "true if the VDI is stored on read-only media"),
        Field("virtual_size", INT64, "size of the VDI as a VM sees it (bytes)"),
        Field(
            "physical_utilisation", INT64, "space used on the physical media (bytes)"
        ),
        Field(
            "persistent",
            BOOL,
            "disk modifications survive VM reboot/shutdown",
            default=True,
        ),
        Field("sm_config", STRING_MAP, "backend-specific parameters"),
    ],
)
VDI_INFO_LIST = Type("vdi_info list", "list", item=VDI_INFO)
ATTACH_INFO = Type(
    "attach_info",
    "struct",
    "configuration for blkback",
    fields=[
        Field(
            "params",
            STRING,
            "the xenstore backend params key (what a VM backend opens)",
        ),
        Field("xenstore_data", STRING_MAP, "additional xenstore backend device keys"),
    ],
)
QUERY_RESULT = Type(
    "query_result",
    "struct",
    "properties of this implementation",
    fields=[
        Field("driver", STRING, "the SR type, used in the XenAPI as SR.type"),
        Field("name", STRING, "short name"),
        Field("description", STRING, "description"),
        Field("vendor", STRING, "entity which produced this implementation"),
        Field("copyright", STRING, "copyright"),
        Field("version", STRING, "version"),
        Field("required_api_version", STRING, "minimum required API version"),
        Field("features", STRING_LIST, "features supported by this plugin"),
        Field("configuration", STRING_MAP, "device_config key -> description"),
    ],
)

# --- methods ------------------------------------------------------------------

_SR = Arg("sr", KEY, "The Storage Repository to operate within")
_VDI = Arg("vdi", KEY, "The Virtual Disk Image to operate on")
_VDI_INFO = Arg("vdi_info", VDI_INFO, "The Virtual Disk Image properties")
_DEVICE_CONFIG = Arg(
    "device_config",
    STRING_MAP,
    "Host-local SR configuration (e.g. address information)",
)


def _dp(text: str) -> Arg:
    return Arg("dp", STRING, text)


_ALL = [
    Method(
        "Query.query",
        [],
        QUERY_RESULT,
        "Query the implementation and return its properties",
        "query_result",
    ),
    Method(
        "Query.diagnostics",
        [],
        STRING,
        "Returns a printable set of backend diagnostic information",
        "diagnostics",
    ),
    Method("SR.ls", [], STRING_LIST, "Returns a list of the attached SRs", "srs"),
    Method(
        "SR.create",
        [
            _SR,
            _DEVICE_CONFIG,
            Arg(
                "physical_size",
                INT64,
                "Requested maximum size of the SR (bytes; 0: none). File SRs report it as "
                "the SR's total (SR.stat) but do not enforce it: VDIs are thin",
            ),
        ],
        UNIT,
        "Creates a fresh SR (Sr_attached if that SR is attached)",
    ),
    Method("SR.attach", [_SR, _DEVICE_CONFIG], UNIT, "Attaches the SR"),
    Method(
        "SR.detach",
        [_SR],
        UNIT,
        "Detaches the SR, first deactivating and detaching any active VDIs; may fail with Sr_not_attached",
    ),
    Method(
        "SR.destroy",
        [_SR],
        UNIT,
        "Destroys (makes unattachable and unprobeable) the SR, first deactivating and detaching "
        "any active VDIs; may fail with Sr_not_attached",
    ),
    Method(
        "SR.reset",
        [_SR],
        UNIT,
        "Declares that the SR has been completely reset, e.g. its backend was rebooted",
    ),
    Method(
        "SR.scan",
        [_SR],
        VDI_INFO_LIST,
        "Returns a list of the visible VDIs in an attached SR",
        "vdis",
    ),
    Method(
        "VDI.create",
        [_SR, _VDI_INFO],
        VDI_INFO,
        "Creates a new VDI in sr using vdi_info; returns the vdi_info actually used (fields may be rounded up)",
        "new_vdi",
    ),
    Method(
        "VDI.snapshot",
        [_SR, _VDI_INFO],
        VDI_INFO,
        "Creates a new VDI which is a snapshot of vdi_info.vdi in sr",
        "new_vdi",
    ),
    Method(
        "VDI.clone",
        [_SR, _VDI_INFO],
        VDI_INFO,
        "Creates a new VDI which is a clone of vdi_info.vdi in sr",
        "new_vdi",
    ),
    Method("VDI.destroy", [_SR, _VDI], UNIT, "Removes vdi from sr"),
    Method(
        "VDI.stat",
        [_SR, _VDI],
        VDI_INFO,
        "Returns the metadata of vdi in sr",
        "vdi_info",
    ),
    Method(
        "VDI.set_persistent",
        [_SR, _VDI, Arg("persistent", BOOL, "New value of the VDI persistent field")],
        UNIT,
        "Configures whether the VDI's contents persist across epochs",
    ),
    Method(
        "VDI.epoch_begin",
        [_SR, _VDI],
        UNIT,
        "Signals that the VDI is about to be connected to a fresh (started, rebooted) VM",
    ),
    Method(
        "VDI.epoch_end",
        [_SR, _VDI],
        UNIT,
        "Signals that the VDI is about to be disconnected from a shutting-down/rebooting VM",
    ),
    Method(
        "VDI.attach",
        [
            _dp("DataPath to attach this VDI for"),
            _SR,
            _VDI,
            Arg(
                "read_write",
                BOOL,
                "If true the DataPath will be used read/write, false otherwise",
            ),
        ],
        ATTACH_INFO,
        "Returns the params for vdi in sr, writable if read_write is true",
        "device",
    ),
    Method(
        "VDI.activate",
        [_dp("DataPath to activate this VDI for"), _SR, _VDI],
        UNIT,
        "Signals the desire to use vdi immediately; attach must come first",
    ),
    Method(
        "VDI.deactivate",
        [_dp("DataPath to deactivate"), _SR, _VDI],
        UNIT,
        "Signals that this client has stopped reading (and writing) vdi",
    ),
    Method(
        "VDI.detach",
        [_dp("DataPath to detach"), _SR, _VDI],
        UNIT,
        "Signals that this client no longer needs the params to be valid",
    ),
    Method(
        "VDI.copy",
        [
            _SR,
            _VDI,
            Arg("url", STRING, "URL which identifies a remote system"),
            Arg("dest", KEY, "The Storage Repository to copy into"),
        ],
        STRING,
        "Copies the data of vdi into the SR dest of the system url names; returns the new VDI",
        "new_vdi",
    ),
    Method(
        "VDI.get_url",
        [_SR, _VDI],
        STRING,
        "Returns a URL for direct access to the disk data",
        "url",
    ),
    Method(
        "VDI.get_by_name",
        [_SR, Arg("name", STRING, "Name of the VDI to return")],
        VDI_INFO,
        "Returns the VDI within sr with this name",
        "vdi_info",
    ),
    Method(
        "VDI.set_content_id",
        [_SR, _VDI, Arg("content_id", STRING, "New value of the VDI content_id field")],
        UNIT,
        "Tells the storage backend that a VDI has an updated content_id",
    ),
    Method(
        "VDI.compose",
        [
            _SR,
            Arg("vdi1", KEY, "The VDI whose content is the base"),
            Arg("vdi2", KEY, "The VDI whose updates are layered onto vdi1 (modified)"),
        ],
        UNIT,
        "Layers the updates from vdi2 onto vdi1, modifying vdi2",
    ),
    Method(
        "VDI.similar_content",
        [_SR, _VDI],
        VDI_INFO_LIST,
        "Returns the VDIs with recognizably similar content, most similar first",
        "vdi_infos",
    ),
]

METHODS: dict[str, Method] = {m.name: m for m in _ALL}

# Served by the dispatcher itself, on any of its endpoints (dispatcher/__init__.py).
DISPATCHER_METHODS = [
    Method(
        "Dispatcher.status",
        [],
        ANY,
        "The dispatcher's plugins, pool slots, SRs of this host and running calls",
        "status",
    ),
    Method(
        "Dispatcher.cancel",
        [Arg("task", STRING, "The dbg of the running (or queued) call to cancel")],
        UNIT,
        "Cancel a call: SIGTERM, then SIGKILL after a grace period; its caller gets "
        "Cancelled (Does_not_exist task if no such call runs)",
    ),
]


def lookup(name: str, extra: Iterable[Method] = ()) -> Method:
    """The method called ``name``: an SMAPI method, else one of ``extra``."""
    method = METHODS.get(name)
    if method is not None:
        return method
    for m in extra:
        if m.name == name:
            return m
    raise UnknownMethod(name if len(name) <= 100 else name[:97] + "...")
