# -*- test-case-name: tests.test_role -*-
"""
The role of a POP: primary or backup.

The role comes from the config file alone (review item 3).  Environment
variables that older versions read, such as C{CLAVITOR_BACKUP_MODE}, are only
reported as ignored; their values are never read.  A backup refuses ordinary
vault writes and never runs a sender (review item 8); callers ask this module
instead of comparing role strings themselves, so "anything but primary" is
decided in one place and fails closed.
"""

import enum
from collections.abc import Mapping

from twisted.logger import Logger

from .errors import WriteRefused


class Role(enum.Enum):
    PRIMARY = "primary"
    BACKUP = "backup"


IGNORED_ENVIRONMENT = ("CLAVITOR_BACKUP_MODE",)


def warn_about_environment(environ: Mapping[str, str], log: Logger) -> None:
    """
    Log a warning for every variable of L{IGNORED_ENVIRONMENT} that is set.

    Only the presence of a variable is looked at, never its value.
    """
    for variable in IGNORED_ENVIRONMENT:
        if variable in environ:
            log.warn(
                "{variable} is set in the environment and ignored: the role "
                "comes from the config file only",
                variable=variable,
            )


def runs_sender(role: Role) -> bool:
    """
    Whether a POP of this role may run the replication sender: only a primary.
    """
    return role is Role.PRIMARY


def require_writable(role: Role) -> None:
    """
    Refuse an ordinary vault write unless this POP is the primary.

    @raise WriteRefused: on a backup (or anything that is not L{Role.PRIMARY}).
    """
    if role is not Role.PRIMARY:
        raise WriteRefused(
            "role: this POP is not the primary; vault writes are refused",
            "write refused on a POP whose role is {!r}".format(role),
        )
