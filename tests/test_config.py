"""
Tests for L{clavitor_twisted.config}.
"""

import dataclasses
import os
import textwrap

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from clavitor_twisted.config import (
    POP_ID_PATTERN,
    AuthConfig,
    BackupPop,
    Config,
    ListenConfig,
    MetricsConfig,
    ReplicationConfig,
    SecurityConfig,
    load_config,
    parse_config,
)
from clavitor_twisted.errors import ConfigError
from clavitor_twisted.role import Role

EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "etc")

PRIMARY = textwrap.dedent(
    """\
    pop_id: calgary-01
    region: north-america
    role: primary
    data_dir: /var/lib/clavitor
    backup_pop:
      id: zurich-01
      url: https://zurich-01.clavitor.ai:8443
    auth:
      mtls_cert: /etc/clavitor/replication.crt
      mtls_key: /etc/clavitor/replication.key
      mtls_ca: /etc/clavitor/ca.crt
    """
)

BACKUP = textwrap.dedent(
    """\
    pop_id: zurich-01
    region: europe
    role: backup
    data_dir: /var/lib/clavitor
    listen:
      address: 0.0.0.0
    authorized_pops:
      - calgary-01
    auth:
      mtls_cert: /etc/clavitor/replication.crt
      mtls_key: /etc/clavitor/replication.key
      mtls_ca: /etc/clavitor/ca.crt
    """
)

AUTH = AuthConfig(
    method="mtls",
    mtls_cert="/etc/clavitor/replication.crt",
    mtls_key="/etc/clavitor/replication.key",
    mtls_ca="/etc/clavitor/ca.crt",
    token_file=None,
    token_rotation_interval=86400,
)


def document(base: str = PRIMARY, **changes: object) -> str:
    """
    C{base} with keys set, or removed when the value is C{...}; a nested key
    is spelled with a double underscore (C{auth__method}).  Dumped by
    PyYAML, so strings are quoted where YAML needs it.
    """
    data = yaml.safe_load(base)
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = data
        for parent in parents:
            target = target.setdefault(parent, {})
        if value is ...:
            target.pop(key, None)
        else:
            target[key] = value
    return yaml.safe_dump(data, sort_keys=False)


class ConfigTestCase(SynchronousTestCase):
    def refused(self, text: str, public: str | None = None) -> ConfigError:
        """
        Parse C{text}, expecting a L{ConfigError} (with C{public} as its
        public text, if given).
        """
        error = self.assertRaises(ConfigError, parse_config, text)
        self.assertEqual(str(error), error.public)
        if public is not None:
            self.assertEqual(error.public, public)
        return error


class ValidConfigTests(ConfigTestCase):
    def test_primary(self) -> None:
        """
        A minimal primary parses to the frozen objects, with every default.
        """
        self.assertEqual(
            parse_config(PRIMARY),
            Config(
                pop_id="calgary-01",
                region="north-america",
                role=Role.PRIMARY,
                data_dir="/var/lib/clavitor",
                auth=AUTH,
                replication=ReplicationConfig(
                    batch_size=100,
                    max_retries=5,
                    request_timeout=30,
                    max_request_age=300,
                    scan_interval=5,
                    max_batch_bytes=8 * 1024 * 1024,
                ),
                security=SecurityConfig(
                    audit_log=None,
                    rate_limit_per_minute=600,
                    ban_after_failures=10,
                    ban_duration=3600,
                    max_request_bytes=32 * 1024 * 1024,
                    max_entry_bytes=1024 * 1024,
                    clock_skew=30,
                ),
                backup_pop=BackupPop(
                    id="zurich-01",
                    url="https://zurich-01.clavitor.ai:8443",
                    host="zurich-01.clavitor.ai",
                    port=8443,
                ),
                listen=None,
                authorized_pops=(),
            ),
        )

    def test_backup(self) -> None:
        """
        A minimal backup parses with its listen address and authorised POPs.
        """
        config = parse_config(BACKUP)
        self.assertEqual(config.role, Role.BACKUP)
        self.assertEqual(config.pop_id, "zurich-01")
        self.assertEqual(config.listen, ListenConfig(address="0.0.0.0", port=8443))
        self.assertEqual(config.authorized_pops, ("calgary-01",))
        self.assertIsNone(config.backup_pop)
        self.assertEqual(config.auth, AUTH)
        self.assertEqual(config.replication, ReplicationConfig())
        self.assertEqual(config.security, SecurityConfig())
        self.assertEqual(config.ignored_keys, ())

    def test_frozen(self) -> None:
        """
        The config objects cannot be changed after parsing.
        """
        config = parse_config(PRIMARY)
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, config, "role", Role.BACKUP)
        self.assertRaises(
            dataclasses.FrozenInstanceError, setattr, config.backup_pop, "url", "https://x"
        )
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, config.auth, "method", "x")

    def test_everything_set(self) -> None:
        """
        Every key can be set, and lands in its field.
        """
        config = parse_config(
            document(
                auth__method="bearer",
                auth__token_file="/etc/clavitor/replication.token",
                auth__token_rotation_interval=3600,
                replication={
                    "batch_size": 10000,
                    "max_retries": 0,
                    "request_timeout": 3600,
                    "max_request_age": 10,
                    "scan_interval": 1,
                    "max_batch_bytes": 1024,
                },
                security={
                    "audit_log": "/var/log/clavitor/replication.log",
                    "rate_limit_per_minute": 1,
                    "ban_after_failures": 3,
                    "ban_duration": 60,
                    "max_request_bytes": 2048,
                    "max_entry_bytes": 2048,
                    "clock_skew": 0,
                    "connections_per_minute": 5,
                },
                listen={"address": "::1", "port": 9443},
                authorized_pops=["zurich-01", "vienna-02"],
            )
        )
        self.assertEqual(config.auth.method, "bearer")
        self.assertEqual(config.auth.token_file, "/etc/clavitor/replication.token")
        self.assertEqual(config.auth.token_rotation_interval, 3600)
        self.assertEqual(config.replication, ReplicationConfig(10000, 0, 3600, 10, 1, 1024))
        self.assertEqual(
            config.security,
            SecurityConfig("/var/log/clavitor/replication.log", 1, 3, 60, 2048, 2048, 0, 5),
        )
        self.assertEqual(config.listen, ListenConfig("::1", 9443))
        self.assertEqual(config.authorized_pops, ("zurich-01", "vienna-02"))

    def test_metrics(self) -> None:
        """
        Status and metrics are off without a C{metrics} section; an empty
        one serves them on 127.0.0.1 port 9464; address and port can be
        any loopback address and port, for either role.
        """
        self.assertIsNone(parse_config(PRIMARY).metrics)
        self.assertEqual(parse_config(document(metrics={})).metrics, MetricsConfig("127.0.0.1", 9464))
        self.assertEqual(
            parse_config(document(BACKUP, metrics={"address": "::1", "port": 9100})).metrics,
            MetricsConfig("::1", 9100),
        )
        self.assertEqual(
            parse_config(document(metrics={"address": "127.0.0.2"})).metrics.address, "127.0.0.2"
        )

    def test_metrics_refused(self) -> None:
        """
        Status and metrics are plain HTTP: any address but loopback is
        refused, and so are unknown keys and ports out of range.
        """
        for address in ("0.0.0.0", "10.0.0.1", "::", "localhost"):
            self.refused(document(metrics={"address": address}))
        self.refused(
            document(metrics={"address": "192.0.2.1"}),
            "metrics.address: must be a loopback address (status and metrics are plain HTTP)",
        )
        self.refused(document(metrics={"port": 0}))
        self.refused(document(metrics={"path": "/x"}), "metrics.path: unknown key")
        self.refused(document(metrics=[9464]), "metrics: must be a mapping")

    def test_backup_pop_on_backup_ignored(self) -> None:
        """
        C{backup_pop} on a backup is checked and reported in C{ignored_keys}
        for the service to warn about.
        """
        config = parse_config(
            document(BACKUP, backup_pop={"id": "vienna-02", "url": "https://vienna-02"})
        )
        self.assertEqual(config.ignored_keys, ("backup_pop",))
        self.refused(
            document(BACKUP, backup_pop={"id": "vienna-02", "url": "http://vienna-02"}),
        )

    def test_primary_ignores_nothing(self) -> None:
        self.assertEqual(parse_config(PRIMARY).ignored_keys, ())

    def test_receiving_keys_on_primary_ignored(self) -> None:
        """
        A primary receives nothing: C{listen}, C{authorized_pops} and
        C{security.audit_log} in its file are reported for a warning.
        """
        config = parse_config(
            document(
                PRIMARY,
                listen={"address": "127.0.0.1"},
                authorized_pops=["vienna-02"],
                security__audit_log="/var/log/clavitor/audit.log",
            )
        )
        self.assertEqual(
            config.ignored_keys, ("listen", "authorized_pops", "security.audit_log")
        )

    def test_examples(self) -> None:
        """
        The example files in etc/ are valid configs of their role.
        """
        primary = load_config(os.path.join(EXAMPLES, "replication.yaml.example"))
        backup = load_config(os.path.join(EXAMPLES, "replication-backup.yaml.example"))
        self.assertEqual(primary.role, Role.PRIMARY)
        self.assertEqual(backup.role, Role.BACKUP)
        self.assertEqual(primary.backup_pop.id, backup.pop_id)
        self.assertIn(primary.pop_id, backup.authorized_pops)

    def test_quoted_strings(self) -> None:
        """
        Quoted, a string YAML would read as something else is a string.
        """
        config = parse_config(PRIMARY.replace("region: north-america", 'region: "no"'))
        self.assertEqual(config.region, "no")

    def test_role_not_from_environment(self) -> None:
        """
        C{CLAVITOR_BACKUP_MODE} in the environment changes nothing.
        """
        old = os.environ.get("CLAVITOR_BACKUP_MODE")
        os.environ["CLAVITOR_BACKUP_MODE"] = "true"
        self.addCleanup(
            lambda: os.environ.pop("CLAVITOR_BACKUP_MODE")
            if old is None
            else os.environ.__setitem__("CLAVITOR_BACKUP_MODE", old)
        )
        self.assertEqual(parse_config(PRIMARY).role, Role.PRIMARY)


class UnsafeYamlTests(ConfigTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.marker = os.path.join(self.directory, "ran")

    def test_python_tags_do_not_run(self) -> None:
        """
        Python object tags are refused and nothing they name is run: the
        file each would create does not exist afterwards.
        """
        for tag in (
            '!!python/object/apply:os.system ["touch {marker}"]',
            '!!python/object/apply:builtins.open ["{marker}", "w"]',
            '!!python/object/new:builtins.open ["{marker}", "w"]',
            '!!python/object/apply:subprocess.call [["touch", "{marker}"]]',
        ):
            for where in ("region: {}", "replication:\n  batch_size: {}", "authorized_pops: [{}]"):
                text = PRIMARY.replace("region: north-america\n", "") + where.format(
                    tag.format(marker=self.marker)
                )
                error = self.refused(text)
                self.assertIn("only strings, integers, booleans, lists and mappings", error.public)
                self.assertFalse(os.path.exists(self.marker))

    def test_marker_detects_a_run(self) -> None:
        """
        The marker technique of the test above works: an unsafe loader does
        run the tag and the file appears.
        """
        yaml.unsafe_load(
            'x: !!python/object/apply:builtins.open ["{}", "w"]'.format(self.marker)
        )["x"].close()
        self.assertTrue(os.path.exists(self.marker))

    def test_python_name_refused(self) -> None:
        self.refused(
            PRIMARY.replace("region: north-america", "region: !!python/name:os.system"),
            "region: only strings, integers, booleans, lists and mappings are allowed",
        )

    def test_local_tag_refused(self) -> None:
        self.refused(PRIMARY.replace("region: north-america", "region: !include x"))

    def test_other_yaml_types_refused(self) -> None:
        """
        Binary, timestamp, set and ordered map are not config values.
        """
        for value in ("!!binary aGVsbG8=", "2024-01-01", "!!set {a}", "!!omap [a: 1]"):
            self.refused(
                PRIMARY.replace("region: north-america", "region: " + value),
                "region: only strings, integers, booleans, lists and mappings are allowed",
            )

    def test_explicit_tags_must_fit(self) -> None:
        """
        An explicit tag that does not fit its value, or its kind of node, is
        refused with the key named (not a crash of the constructor).
        """
        for value in ("!!bool maybe", "!!float abc", "!!null x", "!!int 0x1F"):
            self.refused(document().replace("region: north-america", "region: " + value))
        for value in ("!!str {a: 1}", "!!map [a]", "!!seq {a: 1}", "!!str [a]"):
            self.refused(
                document().replace("region: north-america", "region: " + value),
                "region: only strings, integers, booleans, lists and mappings are allowed",
            )

    def test_fitting_explicit_tags(self) -> None:
        """
        A fitting explicit tag is plain data like any other.
        """
        config = parse_config(
            PRIMARY.replace("region: north-america", "region: !!str yes")
            + "replication: !!map\n  batch_size: !!int 7\n"
        )
        self.assertEqual((config.region, config.replication.batch_size), ("yes", 7))

    @settings(max_examples=500, deadline=None)
    @given(
        st.lists(
            st.sampled_from(
                [
                    "a", "b", "role", "auth", ":", ": ", "- ", "\n", "  ", "{", "}", "[",
                    "]", ", ", "'", '"', "? ", "#", "---\n", "...\n", "&x ", "*x", "<<",
                    "!!bool ", "!!int ", "!!float ", "!!null ", "!!str ", "!!map ",
                    "!!seq ", "!!binary ", "!!python/none ", "!x ", "yes", "010", "1:2",
                    "0x1", ".inf", "~", "9" * 30, "\t", "%YAML 1.1\n", "\\", "\xff",
                ]
            )
        ).map("".join)
    )
    def test_only_config_errors(self, text: str) -> None:
        """
        Whatever the text, parsing gives a config or a L{ConfigError},
        never another exception.
        """
        try:
            parse_config(text)
        except ConfigError:
            pass

    def test_alias_refused(self) -> None:
        self.refused(
            PRIMARY.replace("region: north-america", "region: &r north-america")
            + "data_dir2: *r\n",
            "config: YAML aliases are not allowed",
        )

    def test_merge_key_refused(self) -> None:
        self.refused(
            PRIMARY + "replication:\n  <<: {batch_size: 5}\n",
            "replication: YAML merge keys are not allowed",
        )


class DocumentShapeTests(ConfigTestCase):
    def test_not_a_mapping(self) -> None:
        for text in ("- a\n- b\n", "just text\n", "42\n", "null\n", "---\n"):
            self.refused(text, "config: must be a YAML mapping")

    def test_empty(self) -> None:
        for text in ("", "# only a comment\n", "\n\n"):
            self.refused(text, "config: empty")

    def test_multiple_documents(self) -> None:
        self.refused(PRIMARY + "---\n" + BACKUP, "config: more than one YAML document")

    def test_not_yaml(self) -> None:
        error = self.refused("pop_id: [calgary\n")
        self.assertTrue(error.public.startswith("config: not valid YAML at line "))

    def test_control_character(self) -> None:
        self.refused(PRIMARY + "\x00", "config: not valid YAML")

    def test_deep_nesting(self) -> None:
        self.refused("a: " + "[" * 2000 + "]" * 2000 + "\n", "config: nested too deeply")

    def test_non_string_keys(self) -> None:
        """
        A key that YAML reads as a boolean, number or null is refused.
        """
        for key in ("yes", "no", "1", "~", "[a, b]", "2024-01-01"):
            self.refused(PRIMARY + key + ": x\n", "config: keys must be strings")
        self.refused(
            PRIMARY.replace("auth:\n", "auth:\n  on: x\n"), "auth: keys must be strings"
        )

    def test_duplicate_top_level_key(self) -> None:
        """
        A key given twice is refused, not silently overwritten.
        """
        self.refused(PRIMARY + "role: backup\n", "role: duplicate key")

    def test_duplicate_nested_key(self) -> None:
        self.refused(
            PRIMARY.replace("  mtls_ca: /etc/clavitor/ca.crt\n", "  mtls_ca: /a\n  mtls_ca: /b\n"),
            "auth.mtls_ca: duplicate key",
        )
        self.refused(
            PRIMARY + "replication:\n  x:\n    a: 1\n    a: 2\n", "replication.x.a: duplicate key"
        )

    def test_duplicate_key_in_list(self) -> None:
        self.refused(
            PRIMARY + "authorized_pops:\n  - {a: 1, a: 2}\n", "authorized_pops[0].a: duplicate key"
        )

    def test_duplicate_with_different_quoting(self) -> None:
        """
        C{role} and C{"role"} are the same key.
        """
        self.refused(PRIMARY + '"role": backup\n', "role: duplicate key")

    def test_unknown_top_level_key(self) -> None:
        self.refused(PRIMARY + "pop_idd: x\n", "pop_idd: unknown key")

    def test_unknown_nested_key(self) -> None:
        self.refused(document(auth__token="x"), "auth.token: unknown key")
        self.refused(document(replication={"batchsize": 5}), "replication.batchsize: unknown key")
        self.refused(document(backup_pop__port=1), "backup_pop.port: unknown key")

    def test_unknown_key_name_hidden(self) -> None:
        """
        A key that does not look like a key name (a pasted secret, say) is
        not repeated in the public text.
        """
        secret = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        error = self.refused(document(**{"auth__" + secret: 1}))
        self.assertEqual(error.public, "auth.<key>: unknown key")
        self.assertNotIn(secret, error.detail)

    def test_null_refused(self) -> None:
        """
        C{null} is not a way of leaving a key out.
        """
        self.refused(PRIMARY + "security:\n  audit_log:\n", "security.audit_log: must be a string")
        self.refused(PRIMARY + "replication: ~\n", "replication: must be a mapping")

    def test_section_not_a_mapping(self) -> None:
        self.refused(document(auth="mtls"), "auth: must be a mapping")
        self.refused(document(listen=["0.0.0.0"]), "listen: must be a mapping")


class TypeTests(ConfigTestCase):
    def test_unquoted_no_is_not_a_string(self) -> None:
        """
        C{pop_id: no} is the boolean false in YAML, not the POP "no".
        """
        self.refused(
            PRIMARY.replace("pop_id: calgary-01", "pop_id: no"), "pop_id: must be a string"
        )

    def test_booleans_are_not_strings(self) -> None:
        for value in ("yes", "off", "true", "No"):
            self.refused(
                PRIMARY.replace("region: north-america", "region: " + value),
                "region: must be a string",
            )

    def test_numbers_are_not_strings(self) -> None:
        self.refused(
            PRIMARY.replace("pop_id: calgary-01", "pop_id: 1234"), "pop_id: must be a string"
        )
        self.refused(
            PRIMARY.replace("region: north-america", "region: 1.5"), "region: must be a string"
        )

    def test_bool_is_not_an_int(self) -> None:
        """
        C{true} is not 1.
        """
        self.refused(
            document(replication={"batch_size": True}),
            "replication.batch_size: must be an integer",
        )
        self.refused(
            PRIMARY + "security:\n  clock_skew: yes\n", "security.clock_skew: must be an integer"
        )
        self.refused(
            document(BACKUP, listen={"address": "0.0.0.0", "port": False}),
            "listen.port: must be an integer",
        )

    def test_string_is_not_an_int(self) -> None:
        self.refused(
            PRIMARY + 'replication:\n  batch_size: "100"\n',
            "replication.batch_size: must be an integer",
        )

    def test_float_is_not_an_int(self) -> None:
        for value in ("100.0", "1e3", ".inf", ".nan"):
            self.refused(
                PRIMARY + "replication:\n  batch_size: " + value + "\n",
            )

    def test_integers_plain_decimal(self) -> None:
        """
        YAML 1.1 octal, hex, binary, sexagesimal and underscored integers
        are refused rather than read as a surprising number.
        """
        for value in ("010", "0x10", "0b101", "1:30", "1_000", "0o17", "+0100"):
            self.refused(
                PRIMARY + "replication:\n  batch_size: " + value + "\n",
            )
        self.refused(
            PRIMARY + "replication:\n  batch_size: 010\n",
            "replication.batch_size: integers must be written in plain decimal",
        )

    def test_huge_integer(self) -> None:
        """
        A huge literal is refused without converting it.
        """
        self.refused(PRIMARY + "replication:\n  batch_size: " + "9" * 100_000 + "\n")

    def test_explicit_int_tag(self) -> None:
        config = parse_config(PRIMARY + 'replication:\n  batch_size: !!int "250"\n')
        self.assertEqual(config.replication.batch_size, 250)

    def test_list_expected(self) -> None:
        self.refused(
            document(BACKUP, authorized_pops="calgary-01"),
            "authorized_pops: must be a list of POP ids",
        )

    def test_list_item_type(self) -> None:
        self.refused(
            document(BACKUP, authorized_pops=["calgary-01", False]),
            "authorized_pops[1]: must be a string",
        )


class RangeTests(ConfigTestCase):
    RANGES = {
        "replication": {
            "batch_size": (1, 10_000),
            "max_retries": (0, 100),
            "request_timeout": (1, 3600),
            "max_request_age": (10, 86400),
            "scan_interval": (1, 3600),
            "max_batch_bytes": (1024, 256 * 1024 * 1024),
        },
        "security": {
            "rate_limit_per_minute": (1, 100_000),
            "ban_after_failures": (1, 1000),
            "ban_duration": (1, 7 * 86400),
            "max_request_bytes": (1024, 1024 * 1024 * 1024),
            "max_entry_bytes": (1, 256 * 1024 * 1024),
            "clock_skew": (0, 300),
        },
        "auth": {"token_rotation_interval": (60, 365 * 86400)},
    }

    # Keys set beside the one under test, so that the cross-check between
    # max_entry_bytes and max_request_bytes does not get in the way.
    BESIDE = {
        "max_entry_bytes": {"security__max_request_bytes": 1024 * 1024 * 1024},
        "max_request_bytes": {"security__max_entry_bytes": 1},
    }

    def test_bounds(self) -> None:
        """
        Each integer accepts its bounds and refuses one beyond each.
        """
        for section, keys in self.RANGES.items():
            for key, (low, high) in keys.items():
                name = section + "__" + key
                beside = self.BESIDE.get(key, {})
                for good in (low, high):
                    config = parse_config(document(**{name: good}, **beside))
                    self.assertEqual(getattr(getattr(config, section), key), good)
                for bad in (low - 1, high + 1):
                    self.refused(
                        document(**{name: bad}, **beside),
                        "{}.{}: must be between {} and {}".format(section, key, low, high),
                    )

    @settings(max_examples=200, deadline=None)
    @given(st.integers(min_value=-(10**12), max_value=10**12))
    def test_batch_size_property(self, value: int) -> None:
        """
        C{batch_size} is accepted exactly from 1 to 10000.
        """
        text = document(replication__batch_size=value)
        if 1 <= value <= 10_000:
            self.assertEqual(parse_config(text).replication.batch_size, value)
        else:
            self.refused(text, "replication.batch_size: must be between 1 and 10000")

    def test_entry_larger_than_request(self) -> None:
        self.refused(
            document(security={"max_request_bytes": 4096, "max_entry_bytes": 4097}),
            "security.max_entry_bytes: must not exceed security.max_request_bytes",
        )

    def test_listen_port(self) -> None:
        for port in (0, 65536, -1):
            self.refused(
                document(BACKUP, listen={"address": "0.0.0.0", "port": port}),
                "listen.port: must be between 1 and 65535",
            )


class RoleTests(ConfigTestCase):
    def test_only_primary_or_backup(self) -> None:
        for role in ("secondary", "Primary", "BACKUP", "", "primary "):
            self.refused(document(role=role), "role: must be one of primary, backup")

    def test_role_required(self) -> None:
        self.refused(document(role=...), "role: required")

    def test_primary_needs_backup_pop(self) -> None:
        self.refused(document(backup_pop=...), "backup_pop: required when role is primary")

    def test_backup_needs_listen(self) -> None:
        self.refused(document(BACKUP, listen=...), "listen: required when role is backup")

    def test_backup_needs_authorized_pops(self) -> None:
        self.refused(
            document(BACKUP, authorized_pops=...),
            "authorized_pops: must list at least one POP when role is backup",
        )
        self.refused(
            document(BACKUP, authorized_pops=[]),
            "authorized_pops: must list at least one POP when role is backup",
        )

    def test_required_keys(self) -> None:
        for key in ("pop_id", "region", "data_dir", "auth"):
            self.refused(document(**{key: ...}), key + ": required")
        for key in ("mtls_cert", "mtls_key", "mtls_ca"):
            self.refused(document(**{"auth__" + key: ...}), "auth." + key + ": required")
        self.refused(document(BACKUP, listen={"port": 8443}), "listen.address: required")
        self.refused(document(backup_pop={"id": "zurich-01"}), "backup_pop.url: required")


class AuthTests(ConfigTestCase):
    def test_method_default_mtls(self) -> None:
        self.assertEqual(parse_config(PRIMARY).auth.method, "mtls")

    def test_method_choice(self) -> None:
        for method in ("none", "MTLS", "token", True):
            self.refused(document(auth__method=method), "auth.method: must be one of mtls, bearer")

    def test_bearer_needs_token_file(self) -> None:
        self.refused(
            document(auth__method="bearer"), "auth.token_file: required when auth.method is bearer"
        )

    def test_token_file_only_with_bearer(self) -> None:
        """
        A token file with mTLS is a sign of a confused setup.
        """
        self.refused(
            document(auth__token_file="/etc/clavitor/replication.token"),
            "auth.token_file: only allowed when auth.method is bearer",
        )

    def test_bearer(self) -> None:
        auth = parse_config(
            document(auth__method="bearer", auth__token_file="/etc/clavitor/t")
        ).auth
        self.assertEqual((auth.method, auth.token_file), ("bearer", "/etc/clavitor/t"))


class PathTests(ConfigTestCase):
    PATH_KEYS = (
        "data_dir",
        "auth__mtls_cert",
        "auth__mtls_key",
        "auth__mtls_ca",
        "security__audit_log",
    )

    def test_absolute_only(self) -> None:
        for key in self.PATH_KEYS:
            shown = key.replace("__", ".")
            for value in ("relative/dir", "./x", "~/x", "x"):
                self.refused(document(**{key: value}), shown + ": must be an absolute path")
            self.refused(document(**{key: ""}), shown + ": must not be empty")
            self.refused(document(**{key: 5}), shown + ": must be a string")
            self.refused(
                document(**{key: "/a\nb"}), shown + ": must not contain control characters"
            )

    def test_path_never_in_public(self) -> None:
        """
        A refused path is not repeated in the public text.
        """
        error = self.refused(document(data_dir="var/lib/secret-place"))
        self.assertNotIn("secret-place", error.public)
        self.assertNotIn("secret-place", error.detail)


class PopIdTests(ConfigTestCase):
    def test_bad_pop_ids(self) -> None:
        for key in ("pop_id", "backup_pop__id"):
            for value in (
                "Calgary-01",
                "-calgary",
                "calgary-",
                "a" * 64,
                "cal_gary",
                "calgary.01",
                "",
                "calgary-01\n",
                "caĺgary",
            ):
                self.refused(
                    document(**{key: value}),
                    key.replace("__", ".") + ": must be a POP id (a lower-case DNS label)",
                )

    def test_good_pop_ids(self) -> None:
        for value in ("a", "0", "a" * 63, "calgary-01", "1-2-3"):
            self.assertEqual(parse_config(document(pop_id=value)).pop_id, value)

    def test_pattern_refuses_trailing_newline(self) -> None:
        """
        C{POP_ID_PATTERN.match} cannot be fooled by a trailing newline.
        """
        self.assertIsNone(POP_ID_PATTERN.match("calgary-01\n"))
        self.assertIsNotNone(POP_ID_PATTERN.match("calgary-01"))

    @settings(max_examples=300, deadline=None)
    @given(st.text().filter(lambda s: POP_ID_PATTERN.fullmatch(s) is None))
    def test_any_non_matching_string_refused(self, value: str) -> None:
        """
        Any string not matching L{POP_ID_PATTERN} is refused as C{pop_id}.
        """
        error = self.refused(document(pop_id=value))
        self.assertTrue(error.public.startswith("pop_id: "), error.public)

    @settings(max_examples=200, deadline=None)
    @given(st.from_regex(POP_ID_PATTERN))
    def test_any_matching_string_accepted(self, value: str) -> None:
        """
        Any string matching the pattern is a POP id (unless it is the backup's).
        """
        if value != "zurich-01":
            self.assertEqual(parse_config(document(pop_id=value)).pop_id, value)

    def test_backup_is_not_self(self) -> None:
        self.refused(
            document(backup_pop__id="calgary-01"),
            "backup_pop.id: must not be this POP's own pop_id",
        )

    def test_authorized_not_self(self) -> None:
        self.refused(
            document(BACKUP, authorized_pops=["calgary-01", "zurich-01"]),
            "authorized_pops: must not contain this POP's own pop_id",
        )

    def test_authorized_duplicates(self) -> None:
        self.refused(
            document(BACKUP, authorized_pops=["calgary-01", "calgary-01"]),
            "authorized_pops[1]: duplicate POP id",
        )

    def test_authorized_bad_id(self) -> None:
        self.refused(
            document(BACKUP, authorized_pops=["calgary-01", "Vienna"]),
            "authorized_pops[1]: must be a POP id (a lower-case DNS label)",
        )


class BackupUrlTests(ConfigTestCase):
    def backup_pop(self, url: str) -> BackupPop:
        return parse_config(document(backup_pop__url=url)).backup_pop

    def test_http_refused(self) -> None:
        """
        A plain-HTTP backup URL is refused, naming the key.
        """
        error = self.refused(document(backup_pop__url="http://zurich-01.clavitor.ai:8443"))
        self.assertTrue(error.public.startswith("backup_pop.url: must be an https URL"))

    def test_malformed_refused(self) -> None:
        for url in (
            "https://user@zurich-01",
            "https://user:pw@zurich-01",
            "https://zurich-01/api",
            "https://zurich-01//",
            "https://zurich-01?x=1",
            "https://zurich-01/?x=1",
            "https://zurich-01#f",
            "https://zurich-01:",
            "https://zurich-01:0",
            "https://zurich-01:08443",
            "https://",
            "https:zurich-01",
            "https:///zurich-01",
            "HTTPS://zurich-01",
            "ftp://zurich-01",
            "zurich-01:8443",
            " https://zurich-01",
            "https://zurich-01 ",
            "https://zurich 01",
            "https://zurich-01%2e",
            "https://[::1",
            "https://::1",
        ):
            error = self.refused(document(backup_pop__url=url))
            self.assertTrue(error.public.startswith("backup_pop.url: "), (url, error.public))

    def test_bad_hosts_refused(self) -> None:
        for url in (
            "https://zurich-01.",
            "https://.zurich",
            "https://zu..rich",
            "https://-zurich",
            "https://1.2.3",
            "https://999.1.1.1",
            "https://01.2.3.4",
            "https://" + "a" * 64 + ".example",
            "https://[1:2:3]",
            "https://[fe80::1%eth0]",
        ):
            self.refused(
                document(backup_pop__url=url),
            )

    def test_port_range(self) -> None:
        self.refused(
            document(backup_pop__url="https://zurich-01:65536"),
            "backup_pop.url: port must be between 1 and 65535",
        )

    def test_default_port(self) -> None:
        pop = self.backup_pop("https://zurich-01.clavitor.ai")
        self.assertEqual((pop.host, pop.port), ("zurich-01.clavitor.ai", 443))
        self.assertEqual(pop.url, "https://zurich-01.clavitor.ai:443")

    def test_canonical(self) -> None:
        """
        The URL is stored lower-case, with its port and without a slash.
        """
        pop = self.backup_pop("https://Zurich-01.Clavitor.AI:8443/")
        self.assertEqual(
            pop,
            BackupPop(
                "zurich-01", "https://zurich-01.clavitor.ai:8443", "zurich-01.clavitor.ai", 8443
            ),
        )

    def test_ip_addresses(self) -> None:
        pop = self.backup_pop("https://127.0.0.1:9443")
        self.assertEqual(
            (pop.url, pop.host, pop.port), ("https://127.0.0.1:9443", "127.0.0.1", 9443)
        )
        pop = self.backup_pop("https://[0:0::1]:9443")
        self.assertEqual((pop.url, pop.host, pop.port), ("https://[::1]:9443", "::1", 9443))

    def test_listen_address(self) -> None:
        for address, shown in (("0.0.0.0", "0.0.0.0"), ("::", "::"), ("127.0.0.1", "127.0.0.1")):
            config = parse_config(document(BACKUP, listen={"address": address}))
            self.assertEqual(config.listen.address, shown)
        for address in ("localhost", "0.0.0.0:8443", "256.0.0.1"):
            self.refused(
                document(BACKUP, listen={"address": address}),
                "listen.address: must be an IP address",
            )


class LoadConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.directory = os.path.join(self.directory, "secret-location-7f3a")
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "replication.yaml")

    def write(self, content: bytes, mode: int = 0o600) -> None:
        with open(self.path, "wb") as stream:
            stream.write(content)
        os.chmod(self.path, mode)

    def refused(self, path: str | None = None) -> ConfigError:
        """
        Loading fails, and neither the path nor its parts appear in the
        public text; the detail has the path, for the log.
        """
        error = self.assertRaises(ConfigError, load_config, path or self.path)
        for text in (str(error), error.public):
            self.assertNotIn(self.directory, text)
            self.assertNotIn("secret-location", text)
            self.assertNotIn("replication.yaml", text)
        self.assertIn(path or self.path, error.detail)
        return error

    def test_loads(self) -> None:
        self.write(PRIMARY.encode("utf-8"))
        self.assertEqual(load_config(self.path), parse_config(PRIMARY))

    def test_bad_files_never_show_the_path(self) -> None:
        """
        Whatever is wrong with the file, the public text has no path.
        """
        for content in (
            b"pop_id: [\n",
            PRIMARY.encode() + b"unknown: 1\n",
            PRIMARY.encode() + b"role: backup\n",
            PRIMARY.encode() + b"x: !!python/object/apply:os.system [true]\n",
            b"- 1\n",
            b"",
            PRIMARY.replace("backup_pop:", "backup_pop_:").encode(),
            document(backup_pop__url="http://zurich-01").encode(),
        ):
            self.write(content)
            self.refused()

    def test_missing_file(self) -> None:
        """
        A missing file names neither the path nor the OS error in public.
        """
        error = self.refused()
        self.assertEqual(error.public, "config: cannot be read")
        self.assertNotIn("No such file", error.public)
        self.assertIn("No such file", error.detail)

    def test_unreadable_file(self) -> None:
        """
        A file without read permission gives the same public text.
        """
        if os.geteuid() == 0:
            raise self.skipTest("root reads files whatever their mode")
        self.write(PRIMARY.encode(), mode=0o000)
        self.assertEqual(self.refused().public, "config: cannot be read")

    def test_directory(self) -> None:
        self.assertEqual(self.refused(self.directory).public, "config: not a regular file")

    def test_fifo(self) -> None:
        os.mkfifo(self.path, 0o600)
        self.assertEqual(self.refused().public, "config: not a regular file")

    def test_writable_by_group_or_others(self) -> None:
        """
        A config file others may write is refused: it decides the role and
        the trust of the POP.  Readable by all is fine (it holds no secret).
        """
        for mode in (0o666, 0o620, 0o602):
            self.write(PRIMARY.encode(), mode=mode)
            self.assertEqual(
                self.refused().public, "config: writable by group or others"
            )
        self.write(PRIMARY.encode(), mode=0o644)
        self.assertEqual(load_config(self.path).role, Role.PRIMARY)

    def test_readable_by_others_is_fine(self) -> None:
        """
        The config holds no secret, so 0644 is fine.
        """
        self.write(PRIMARY.encode(), mode=0o644)
        self.assertEqual(load_config(self.path).pop_id, "calgary-01")

    def test_not_utf8(self) -> None:
        self.write(PRIMARY.encode() + b"region2: \xff\xfe\n")
        self.assertEqual(self.refused().public, "config: not valid UTF-8")

    def test_too_large(self) -> None:
        self.write(PRIMARY.encode() + b"#" * (1024 * 1024))
        self.assertEqual(self.refused().public, "config: larger than 1048576 bytes")

    def test_bom(self) -> None:
        """
        A UTF-8 byte order mark is tolerated.
        """
        self.write(b"\xef\xbb\xbf" + PRIMARY.encode())
        self.assertEqual(load_config(self.path).pop_id, "calgary-01")
