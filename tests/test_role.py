"""
Tests for L{clavitor_twisted.role}.
"""

from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from clavitor_twisted.errors import WriteRefused
from clavitor_twisted.role import (
    IGNORED_ENVIRONMENT,
    Role,
    require_writable,
    runs_sender,
    warn_about_environment,
)


class RoleTests(SynchronousTestCase):
    def test_values(self) -> None:
        """
        The two roles are spelled as in the config file.
        """
        self.assertEqual(Role("primary"), Role.PRIMARY)
        self.assertEqual(Role("backup"), Role.BACKUP)
        self.assertEqual(len(Role), 2)

    def test_only_primary_runs_sender(self) -> None:
        """
        A primary runs the sender; a backup, or anything that is not the
        primary role (such as the string "primary"), does not.
        """
        self.assertTrue(runs_sender(Role.PRIMARY))
        self.assertFalse(runs_sender(Role.BACKUP))
        self.assertFalse(runs_sender("primary"))  # type: ignore[arg-type]

    def test_primary_writable(self) -> None:
        """
        Writes are allowed on a primary.
        """
        self.assertIsNone(require_writable(Role.PRIMARY))

    def test_backup_refuses_writes(self) -> None:
        """
        A backup refuses ordinary writes with L{WriteRefused} whose public
        text names the role.
        """
        error = self.assertRaises(WriteRefused, require_writable, Role.BACKUP)
        self.assertTrue(error.public.startswith("role: "))

    def test_not_a_role_refuses_writes(self) -> None:
        """
        Anything other than L{Role.PRIMARY} fails closed.
        """
        self.assertRaises(WriteRefused, require_writable, "primary")


class EnvironmentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict] = []
        self.log = Logger(observer=self.events.append)

    def test_backup_mode_variable_listed(self) -> None:
        """
        The old backup-mode variable is one of the ignored ones.
        """
        self.assertIn("CLAVITOR_BACKUP_MODE", IGNORED_ENVIRONMENT)

    def test_warns_when_set(self) -> None:
        """
        A set variable gives one warning naming the variable, and its value
        appears nowhere in the event.
        """
        warn_about_environment(
            {"CLAVITOR_BACKUP_MODE": "value-not-to-be-read", "PATH": "/bin"}, self.log
        )
        self.assertEqual(len(self.events), 1)
        [event] = self.events
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertEqual(event["variable"], "CLAVITOR_BACKUP_MODE")
        self.assertIn("CLAVITOR_BACKUP_MODE", formatEvent(event))
        self.assertNotIn("value-not-to-be-read", repr(event))
        self.assertNotIn("value-not-to-be-read", formatEvent(event))

    def test_warns_when_set_empty(self) -> None:
        """
        An empty value still counts as set.
        """
        warn_about_environment({"CLAVITOR_BACKUP_MODE": ""}, self.log)
        self.assertEqual(len(self.events), 1)

    def test_silent_when_unset(self) -> None:
        """
        Nothing is logged when no ignored variable is set.
        """
        warn_about_environment({"PATH": "/bin", "HOME": "/root"}, self.log)
        self.assertEqual(self.events, [])
