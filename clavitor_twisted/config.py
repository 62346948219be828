# -*- test-case-name: tests.test_config -*-
"""
C{replication.yaml} -> one frozen, validated L{Config}.

The file decides the role of the POP and whom it trusts, so it is read
strictly: a restricted C{SafeLoader} that builds only plain data (strings,
integers, booleans, lists, mappings; no aliases, merge keys or other tags),
duplicate keys refused at any depth, non-string keys refused, unknown keys
refused, every value type-checked (an unquoted C{no} is a boolean, not a
string; a boolean is not an integer; integers are plain decimal), numbers in
sane ranges, paths absolute.  C{null} is never a value: leave a key out to
get its default.

Every mistake is a L{ConfigError} whose C{public} text names the key and the
check ("backup_pop.url: must be an https URL"), never a filesystem path or a
value; C{detail} adds where the text came from (the file's path) for the log.

Per role: a primary needs C{backup_pop}; a backup needs C{listen} and a
non-empty C{authorized_pops}.  C{backup_pop} on a backup is allowed (the same
file may be kept across a promotion) and checked, but not used: the caller
logs a warning for every name in L{Config.ignored_keys}.
"""

import ipaddress
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from yaml.events import StreamEndEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import ConfigError
from .files import read_guarded
from .role import Role

# A POP id is a DNS label.  \Z rather than $: "$" also matches before a
# trailing newline, so "calgary-01\n" would pass re.match.
POP_ID_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")

MAX_CONFIG_BYTES = 1024 * 1024
MiB = 1024 * 1024

_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
_MERGE = "tag:yaml.org,2002:merge"

# Plain decimal only: YAML 1.1 would read 010 as 8, 0x10 as 16 and 1:30 as
# 90.  At most 19 digits, so int() never meets a huge literal.
_DECIMAL = re.compile(r"[-+]?(0|[1-9][0-9]{0,18})\Z")
# Key names shown in public texts; anything else (it could be a pasted
# secret) is shown as <key>.
_SHOWABLE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,39}\Z")
_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
_HTTPS_URL = re.compile(
    r"https://(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+))"
    r"(?::(?P<port>[1-9][0-9]{0,4}))?/?\Z"
)


@dataclass(frozen=True)
class BackupPop:
    """
    Where a primary sends its batches.  C{url} is canonical
    (C{https://host:port}, lower-case host, explicit port, no trailing
    slash); C{host} has no brackets for an IPv6 address.
    """

    id: str
    url: str
    host: str
    port: int


@dataclass(frozen=True)
class AuthConfig:
    """
    How POPs prove who they are.  The certificate, key and CA are always
    needed (the backup serves TLS with its certificate, the primary checks
    it with the CA); C{token_file} is set exactly when C{method} is
    C{"bearer"}.
    """

    method: str
    mtls_cert: str
    mtls_key: str
    mtls_ca: str
    token_file: str | None = None
    token_rotation_interval: int = 86400


@dataclass(frozen=True)
class ReplicationConfig:
    batch_size: int = 100
    max_retries: int = 5
    request_timeout: int = 30
    max_request_age: int = 300
    scan_interval: int = 5
    max_batch_bytes: int = 8 * MiB


@dataclass(frozen=True)
class SecurityConfig:
    audit_log: str | None = None
    # Requests, not entries: a primary draining a backlog sends batches back
    # to back, and 60 (one a second) would hold it to batch_size entries/s.
    rate_limit_per_minute: int = 600
    ban_after_failures: int = 10
    ban_duration: int = 3600
    max_request_bytes: int = 32 * MiB
    max_entry_bytes: int = 1 * MiB
    clock_skew: int = 30
    # New connections, per peer address, before any TLS work: a primary
    # keeps its connections open, so it needs a few.
    connections_per_minute: int = 600


@dataclass(frozen=True)
class ListenConfig:
    address: str
    port: int = 8443


@dataclass(frozen=True)
class MetricsConfig:
    """
    Where the status and metrics of this POP are served (plain HTTP, so a
    loopback address only).
    """

    address: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True)
class Config:
    pop_id: str
    region: str
    role: Role
    data_dir: str
    auth: AuthConfig
    replication: ReplicationConfig
    security: SecurityConfig
    backup_pop: BackupPop | None
    listen: ListenConfig | None
    authorized_pops: tuple[str, ...]
    metrics: MetricsConfig | None = None

    @property
    def ignored_keys(self) -> tuple[str, ...]:
        """
        Keys present in the file that this role does not use (C{backup_pop}
        on a backup; C{listen}, C{authorized_pops} and C{security.audit_log}
        on a primary, which receives nothing); the service logs a warning for
        each.
        """
        if self.role is Role.BACKUP:
            present = {"backup_pop": self.backup_pop is not None}
        else:
            present = {
                "listen": self.listen is not None,
                "authorized_pops": bool(self.authorized_pops),
                "security.audit_log": self.security.audit_log is not None,
            }
        return tuple(key for key, there in present.items() if there)


KeyPath = tuple[str | int, ...]


class _Invalid(Exception):
    """
    A mistake at C{path}; L{parse_config} turns it into a L{ConfigError}.
    """

    def __init__(self, path: KeyPath, problem: str, detail: str = "") -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem
        self.detail = detail


def _render(path: KeyPath) -> str:
    """
    A key path as the public texts show it: C{auth.method},
    C{authorized_pops[1]}, or C{config} for the document itself.
    """
    text = ""
    for part in path:
        if isinstance(part, int):
            text += "[{}]".format(part)
        else:
            name = part if _SHOWABLE_KEY.match(part) else "<key>"
            text += "." + name if text else name
    return text or "config"


# The only YAML that a config is made of: which tags each kind of node may
# carry.  Anything else is refused before construction.
_ALLOWED_TAGS = {
    ScalarNode: (_NULL, _BOOL, _INT, _FLOAT, _STR),
    SequenceNode: (_SEQ,),
    MappingNode: (_MAP,),
}


class _StrictLoader(yaml.SafeLoader):
    """
    A C{SafeLoader} that builds plain data only.  L{_check} refuses anything
    else before construction, naming the key; the constructor table holds
    only the allowed tags and refuses any other should a node ever reach it.
    """

    yaml_constructors = {
        tag: yaml.SafeLoader.yaml_constructors[tag]
        for tags in _ALLOWED_TAGS.values()
        for tag in tags
    }
    yaml_constructors[None] = yaml.SafeLoader.construct_undefined
    yaml_multi_constructors: dict = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        # An alias shares one node between keys (and is how "billion laughs"
        # documents grow); a config never needs one.
        if self.check_event(yaml.AliasEvent):
            raise _Invalid((), "YAML aliases are not allowed")
        return super().compose_node(parent, index)

    def load_document(self) -> Any:
        """
        The one document of the stream, checked and constructed.
        """
        self.get_event()  # stream start
        if self.check_event(StreamEndEvent):
            raise _Invalid((), "empty")
        node = self.compose_document()
        if not self.check_event(StreamEndEvent):
            raise _Invalid((), "more than one YAML document")
        if not isinstance(node, MappingNode):
            raise _Invalid((), "must be a YAML mapping")
        self._check(node, ())
        return self.construct_document(node)

    def _check(self, node: Node, path: KeyPath) -> None:
        """
        Refuse, naming the key, what this loader does not build: tags other
        than plain data, a scalar whose explicit tag does not fit its text
        (C{!!bool maybe}), integers not in plain decimal, merge keys,
        non-string and duplicate keys.
        """
        if node.tag not in _ALLOWED_TAGS[type(node)]:
            raise _Invalid(
                path,
                "only strings, integers, booleans, lists and mappings are allowed",
                "YAML tag {!r}".format(node.tag),
            )
        if isinstance(node, ScalarNode):
            implicit = self.resolve(ScalarNode, node.value, (True, False))
            if node.tag != _STR and implicit != node.tag:
                raise _Invalid(path, "value does not fit its YAML tag")
            if node.tag == _INT and not _DECIMAL.match(node.value):
                raise _Invalid(path, "integers must be written in plain decimal")
        elif isinstance(node, SequenceNode):
            for index, item in enumerate(node.value):
                self._check(item, path + (index,))
        else:
            seen = set()
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE:
                    raise _Invalid(path, "YAML merge keys are not allowed")
                if not isinstance(key_node, ScalarNode) or key_node.tag != _STR:
                    raise _Invalid(path, "keys must be strings")
                key = key_node.value
                if key in seen:
                    raise _Invalid(path + (key,), "duplicate key")
                seen.add(key)
                self._check(value_node, path + (key,))


def _load_yaml(text: str) -> dict:
    loader = None
    try:
        # The reader refuses unprintable characters already here.
        loader = _StrictLoader(text)
        return loader.load_document()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = (
            " at line {}, column {}".format(mark.line + 1, mark.column + 1) if mark else ""
        )
        raise _Invalid(
            (),
            "not valid YAML" + where,
            " ".join(part for part in (error.context, error.problem) if part),
        )
    except yaml.YAMLError as error:
        raise _Invalid((), "not valid YAML", str(error))
    except RecursionError:
        raise _Invalid((), "nested too deeply")
    finally:
        if loader is not None:
            loader.dispose()


# Value checks: each takes the YAML value and its path and returns the
# value for the config object, or raises _Invalid naming the path.

Check = Callable[[Any, KeyPath], Any]


def _string(value: Any, path: KeyPath, max_length: int = 255) -> str:
    if type(value) is not str:
        raise _Invalid(path, "must be a string", "got {}".format(type(value).__name__))
    if not value:
        raise _Invalid(path, "must not be empty")
    if len(value) > max_length:
        raise _Invalid(path, "longer than {} characters".format(max_length))
    if not value.isprintable():
        raise _Invalid(path, "must not contain control characters")
    return value


def _region(value: Any, path: KeyPath) -> str:
    return _string(value, path, max_length=64)


def _absolute_path(value: Any, path: KeyPath) -> str:
    value = _string(value, path, max_length=4096)
    if not os.path.isabs(value):
        raise _Invalid(path, "must be an absolute path")
    return value


def _integer(low: int, high: int) -> Check:
    def check(value: Any, path: KeyPath) -> int:
        # type(), not isinstance(): True is an int to Python, not to us.
        if type(value) is not int:
            raise _Invalid(path, "must be an integer", "got {}".format(type(value).__name__))
        if not low <= value <= high:
            raise _Invalid(path, "must be between {} and {}".format(low, high))
        return value

    return check


def _choice(*options: str) -> Check:
    def check(value: Any, path: KeyPath) -> str:
        if type(value) is not str or value not in options:
            raise _Invalid(path, "must be one of " + ", ".join(options))
        return value

    return check


def _role(value: Any, path: KeyPath) -> Role:
    return Role(_choice(*(role.value for role in Role))(value, path))


def _pop_id(value: Any, path: KeyPath) -> str:
    if type(value) is not str:
        raise _Invalid(path, "must be a string", "got {}".format(type(value).__name__))
    if not POP_ID_PATTERN.match(value):
        raise _Invalid(path, "must be a POP id (a lower-case DNS label)")
    return value


def _pop_ids(value: Any, path: KeyPath) -> tuple[str, ...]:
    if type(value) is not list:
        raise _Invalid(path, "must be a list of POP ids")
    pops = tuple(_pop_id(item, path + (index,)) for index, item in enumerate(value))
    for index, pop in enumerate(pops):
        if pop in pops[:index]:
            raise _Invalid(path + (index,), "duplicate POP id")
    return pops


def _ip_address(value: Any, path: KeyPath) -> str:
    value = _string(value, path, max_length=64)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _Invalid(path, "must be an IP address")


def _https_url(value: Any, path: KeyPath) -> tuple[str, str, int]:
    """
    C{https://host[:port]} with an optional "/", nothing else: the canonical
    URL, the host (no brackets) and the port (443 if not given).
    """
    value = _string(value, path, max_length=300)
    match = _HTTPS_URL.match(value)
    if match is None:
        raise _Invalid(
            path,
            "must be an https URL: https://host[:port] without user, path, query or fragment",
        )
    port = int(match.group("port") or 443)
    if port > 65535:
        raise _Invalid(path, "port must be between 1 and 65535")
    if match.group("ipv6") is not None:
        try:
            host = str(ipaddress.IPv6Address(match.group("ipv6")))
        except ValueError:
            raise _Invalid(path, "host is not a valid IPv6 address")
        return "https://[{}]:{}".format(host, port), host, port
    host = match.group("host").lower()
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        labels = host.split(".")
        if (
            len(host) > 253
            or not all(_HOST_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()
        ):
            raise _Invalid(path, "host is not a valid host name or IP address")
    return "https://{}:{}".format(host, port), host, port


def _section(
    value: Any, path: KeyPath, checks: dict[str, Check], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """
    Check one mapping of the config against its keys: unknown keys first,
    then missing required ones, then each value in the order of C{checks}.
    Keys left out are left out of the result, so the dataclass default
    applies.
    """
    if type(value) is not dict:
        raise _Invalid(path, "must be a mapping")
    for key in value:
        if key not in checks:
            raise _Invalid(path + (key,), "unknown key")
    for key in required:
        if key not in value:
            raise _Invalid(path + (key,), "required")
    return {
        key: check(value[key], path + (key,)) for key, check in checks.items() if key in value
    }


def _backup_pop(value: Any, path: KeyPath) -> BackupPop:
    fields = _section(value, path, {"id": _pop_id, "url": _https_url}, ("id", "url"))
    url, host, port = fields["url"]
    return BackupPop(fields["id"], url, host, port)


def _auth(value: Any, path: KeyPath) -> AuthConfig:
    fields = _section(
        value,
        path,
        {
            "method": _choice("mtls", "bearer"),
            "mtls_cert": _absolute_path,
            "mtls_key": _absolute_path,
            "mtls_ca": _absolute_path,
            "token_file": _absolute_path,
            "token_rotation_interval": _integer(60, 365 * 86400),
        },
        ("mtls_cert", "mtls_key", "mtls_ca"),
    )
    fields.setdefault("method", "mtls")
    if fields["method"] == "bearer" and "token_file" not in fields:
        raise _Invalid(path + ("token_file",), "required when auth.method is bearer")
    if fields["method"] == "mtls" and "token_file" in fields:
        raise _Invalid(path + ("token_file",), "only allowed when auth.method is bearer")
    return AuthConfig(**fields)


def _replication(value: Any, path: KeyPath) -> ReplicationConfig:
    return ReplicationConfig(
        **_section(
            value,
            path,
            {
                "batch_size": _integer(1, 10_000),
                "max_retries": _integer(0, 100),
                "request_timeout": _integer(1, 3600),
                "max_request_age": _integer(10, 86400),
                "scan_interval": _integer(1, 3600),
                "max_batch_bytes": _integer(1024, 256 * MiB),
            },
        )
    )


def _security(value: Any, path: KeyPath) -> SecurityConfig:
    security = SecurityConfig(
        **_section(
            value,
            path,
            {
                "audit_log": _absolute_path,
                "rate_limit_per_minute": _integer(1, 100_000),
                "connections_per_minute": _integer(1, 100_000),
                "ban_after_failures": _integer(1, 1000),
                "ban_duration": _integer(1, 7 * 86400),
                "max_request_bytes": _integer(1024, 1024 * MiB),
                "max_entry_bytes": _integer(1, 256 * MiB),
                "clock_skew": _integer(0, 300),
            },
        )
    )
    if security.max_entry_bytes > security.max_request_bytes:
        raise _Invalid(
            path + ("max_entry_bytes",), "must not exceed security.max_request_bytes"
        )
    return security


def _listen(value: Any, path: KeyPath) -> ListenConfig:
    return ListenConfig(
        **_section(
            value,
            path,
            {"address": _ip_address, "port": _integer(1, 65535)},
            ("address",),
        )
    )


def _loopback_address(value: Any, path: KeyPath) -> str:
    address = _ip_address(value, path)
    if not ipaddress.ip_address(address).is_loopback:
        raise _Invalid(path, "must be a loopback address (status and metrics are plain HTTP)")
    return address


def _metrics(value: Any, path: KeyPath) -> MetricsConfig:
    return MetricsConfig(
        **_section(value, path, {"address": _loopback_address, "port": _integer(1, 65535)})
    )


def _config(document: dict) -> Config:
    fields = _section(
        document,
        (),
        {
            "pop_id": _pop_id,
            "region": _region,
            "role": _role,
            "data_dir": _absolute_path,
            "backup_pop": _backup_pop,
            "auth": _auth,
            "replication": _replication,
            "security": _security,
            "listen": _listen,
            "authorized_pops": _pop_ids,
            "metrics": _metrics,
        },
        ("pop_id", "region", "role", "data_dir", "auth"),
    )
    role = fields["role"]
    backup_pop = fields.get("backup_pop")
    listen = fields.get("listen")
    authorized_pops = fields.get("authorized_pops", ())
    if role is Role.PRIMARY and backup_pop is None:
        raise _Invalid(("backup_pop",), "required when role is primary")
    if role is Role.BACKUP and listen is None:
        raise _Invalid(("listen",), "required when role is backup")
    if role is Role.BACKUP and not authorized_pops:
        raise _Invalid(("authorized_pops",), "must list at least one POP when role is backup")
    if backup_pop is not None and backup_pop.id == fields["pop_id"]:
        raise _Invalid(("backup_pop", "id"), "must not be this POP's own pop_id")
    if fields["pop_id"] in authorized_pops:
        raise _Invalid(("authorized_pops",), "must not contain this POP's own pop_id")
    return Config(
        pop_id=fields["pop_id"],
        region=fields["region"],
        role=role,
        data_dir=fields["data_dir"],
        auth=fields["auth"],
        replication=fields.get("replication", ReplicationConfig()),
        security=fields.get("security", SecurityConfig()),
        backup_pop=backup_pop,
        listen=listen,
        authorized_pops=authorized_pops,
        metrics=fields.get("metrics"),
    )


def parse_config(text: str, source: str = "config") -> Config:
    """
    Parse and check a config document.

    @param source: where C{text} came from (a path, say); it goes into the
        C{detail} of an error only, never into C{public}.
    @raise ConfigError: on any problem, C{public} naming the key.
    """
    try:
        return _config(_load_yaml(text))
    except _Invalid as invalid:
        public = "{}: {}".format(_render(invalid.path), invalid.problem)
        detail = public
        if invalid.detail:
            detail += " ({})".format(invalid.detail)
        detail += " in {!r}".format(source)
        raise ConfigError(public, detail) from None


def load_config(path: str) -> Config:
    """
    Read and check the config file at C{path}.

    The file must be a regular file of at most 1 MiB, UTF-8, and not
    writable by group or others (whoever can write it decides the role and the trust
    of this POP).

    @raise ConfigError: on any problem; neither the path nor an OS error
        text is in C{public}, both are in C{detail}.
    """
    content, _ = read_guarded(
        path,
        what="config",
        error=ConfigError,
        forbidden_mode=stat.S_IWGRP | stat.S_IWOTH,
        refusal="writable by group or others",
        max_bytes=MAX_CONFIG_BYTES,
    )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            "config: not valid UTF-8",
            "config file {!r}: invalid UTF-8 at byte {}".format(path, error.start),
        )
    return parse_config(text, source=path)
