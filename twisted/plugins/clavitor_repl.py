# -*- test-case-name: tests.test_service -*-
"""
The twistd plugin: C{twistd clavitor-repl --config FILE}.

Twisted imports every module in every C{twisted/plugins} directory whenever
it looks for plugins (C{twistd --help} does), so this module imports nothing
of ours at module level: the service is built inside L{makeService}.
"""

from zope.interface import implementer

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage


class Options(usage.Options):
    """
    The plugin's command line: the path of the replication config file.
    """

    optParameters = [
        ["config", "c", None, "The replication config file (YAML). Required."],
    ]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config is required")


@implementer(IServiceMaker, IPlugin)
class ClavitorReplMaker:
    """
    Builds the replication service of one POP from its config file.
    """

    tapname = "clavitor-repl"
    description = "Replicate Clavitor vaults from a primary POP to its backup."
    options = Options

    def makeService(self, options):
        import sys

        from twisted.internet import reactor

        from clavitor_twisted.service import service_from_file

        # twistd's own options (the parent) say whether it will daemonize.
        twistd = getattr(options, "parent", None)
        daemonizes = twistd is not None and not twistd.get("nodaemon", True)
        return service_from_file(options["config"], reactor, sys.stderr, daemonizes)


serviceMaker = ClavitorReplMaker()
