"""
Tests for L{clavitor_twisted.tls}: loading identities, and real loopback
TLS connections between the options and policy it builds.
"""

import datetime
import ipaddress
import json
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from clavitor_twisted import pki
from clavitor_twisted.errors import CertificateError
from clavitor_twisted.tls import (
    BackupPolicy,
    PopIdentity,
    dns_names,
    load_ca,
    load_identity,
    load_pop_identity,
    peer_certificate,
    server_options,
)


class PKIFiles:
    """
    A CA and POP certificates written into a fresh directory.
    """

    def __init__(self, directory, ca_name="clavitor dev CA"):
        self.directory = directory
        os.makedirs(directory)
        self.ca_key, self.ca_cert = pki.make_ca(ca_name)
        self.ca_path = os.path.join(directory, "ca.crt")
        pki.write_certificate(self.ca_path, self.ca_cert)

    def pop(self, pop_id, hosts=(), ips=()):
        return pki.write_pop_files(
            self.directory, self.ca_key, self.ca_cert, pop_id, hosts, ips
        )

    def identity(self, pop_id, hosts=(), ips=()):
        return load_identity(*self.pop(pop_id, hosts, ips))

    def ca(self):
        return load_ca(self.ca_path)


def write(path, data, mode=0o600):
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
        f.write(data)


class LoadPopIdentityTests(SynchronousTestCase):
    """
    A POP's own certificate must be valid now and name its pop_id: the peer
    would refuse it otherwise, and say why only in its own log.
    """

    def setUp(self):
        self.pki = PKIFiles(self.mktemp())

    def refused(self, cert_path, key_path, pop_id):
        error = self.assertRaises(
            CertificateError, load_pop_identity, cert_path, key_path, pop_id
        )
        self.assertTrue(error.public.startswith("auth.mtls_cert: "), error.public)
        self.assertNotIn(self.pki.directory, error.public)
        return error.public

    def test_names_pop_id(self):
        identity = load_pop_identity(*self.pki.pop("calgary-01"), "calgary-01")
        self.assertIn("calgary-01", dns_names(identity.certificate))

    def test_other_pop_id(self):
        public = self.refused(*self.pki.pop("evil-01", hosts=["zurich-01.example"]), "zurich-01")
        self.assertIn("pop_id", public)

    def test_expired(self):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "calgary-01")]))
            .issuer_name(self.pki.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=30))
            .not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName("calgary-01")]), critical=False
            )
            .sign(self.pki.ca_key, hashes.SHA256())
        )
        cert_path = os.path.join(self.pki.directory, "old.crt")
        key_path = os.path.join(self.pki.directory, "old.key")
        pki.write_certificate(cert_path, certificate)
        pki.write_key(key_path, key)
        self.assertIn("not valid now", self.refused(cert_path, key_path, "calgary-01"))


class LoadIdentityTests(SynchronousTestCase):
    def setUp(self):
        self.pki = PKIFiles(self.mktemp())
        self.cert_path, self.key_path = self.pki.pop("calgary-01")

    def assertRefused(self, config_key, *paths, loader=load_identity):
        """
        Loading fails with a CertificateError whose public text names the
        config key and none of the paths; the detail may hold a path.
        """
        if not paths:
            paths = (self.cert_path, self.key_path)
        error = self.assertRaises(CertificateError, loader, *paths)
        self.assertTrue(error.public.startswith(config_key + ": "), error.public)
        for path in paths:
            self.assertNotIn(path, error.public)
            self.assertNotIn(os.path.basename(path), error.public)
        return error

    def test_loads(self):
        identity = load_identity(self.cert_path, self.key_path)
        self.assertIsInstance(identity, PopIdentity)
        self.assertEqual(dns_names(identity.certificate), frozenset(["calgary-01"]))
        self.assertEqual(
            identity.private_key.public_key(), identity.certificate.public_key()
        )
        self.assertEqual(
            identity.twisted.original.to_cryptography(), identity.certificate
        )
        self.assertEqual(
            identity.twisted.privateKey.original.to_cryptography_key().public_key(),
            identity.certificate.public_key(),
        )

    def test_key_readable_by_group(self):
        os.chmod(self.key_path, 0o640)
        error = self.assertRefused("auth.mtls_key")
        self.assertIn("640", error.detail)

    def test_key_readable_by_others(self):
        os.chmod(self.key_path, 0o604)
        self.assertRefused("auth.mtls_key")

    def test_key_writable_by_group(self):
        os.chmod(self.key_path, 0o620)
        self.assertRefused("auth.mtls_key")

    def test_key_of_another_certificate(self):
        """
        A key that is not the certificate's is refused, even from the same CA.
        """
        _, other_key_path = self.pki.pop("zurich-01")
        self.assertRefused("auth.mtls_key", self.cert_path, other_key_path)

    def test_missing_key(self):
        self.assertRefused(
            "auth.mtls_key", self.cert_path, os.path.join(self.pki.directory, "no.key")
        )

    def test_missing_certificate(self):
        self.assertRefused(
            "auth.mtls_cert", os.path.join(self.pki.directory, "no.crt"), self.key_path
        )

    def test_key_not_pem(self):
        garbage = os.path.join(self.pki.directory, "garbage.key")
        write(garbage, b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
        self.assertRefused("auth.mtls_key", self.cert_path, garbage)

    def test_key_is_a_certificate(self):
        copy = os.path.join(self.pki.directory, "copy.key")
        with open(self.cert_path, "rb") as f:
            write(copy, f.read())
        self.assertRefused("auth.mtls_key", self.cert_path, copy)

    def test_key_is_a_directory(self):
        """
        A directory is not a key, whatever its mode.
        """
        directory = os.path.join(self.pki.directory, "dir.key")
        os.mkdir(directory, 0o700)
        self.assertRefused("auth.mtls_key", self.cert_path, directory)

    def test_certificate_not_pem(self):
        garbage = os.path.join(self.pki.directory, "garbage.crt")
        write(garbage, b"hello", 0o644)
        self.assertRefused("auth.mtls_cert", garbage, self.key_path)

    def test_two_certificates(self):
        both = os.path.join(self.pki.directory, "both.crt")
        with open(self.cert_path, "rb") as f, open(self.pki.ca_path, "rb") as g:
            write(both, f.read() + g.read(), 0o644)
        self.assertRefused("auth.mtls_cert", both, self.key_path)

    def test_ca(self):
        ca = load_ca(self.pki.ca_path)
        self.assertIsInstance(ca, ssl.Certificate)
        self.assertEqual(ca.original.to_cryptography(), self.pki.ca_cert)

    def test_ca_missing(self):
        self.assertRefused(
            "auth.mtls_ca", os.path.join(self.pki.directory, "no.crt"), loader=load_ca
        )

    def test_ca_not_a_ca(self):
        """
        A POP certificate given as the CA is refused.
        """
        self.assertRefused("auth.mtls_ca", self.cert_path, loader=load_ca)


class DNSNamesTests(SynchronousTestCase):
    def certificate(self, common_name, san=None):
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(datetime.datetime(2020, 1, 1))
            .not_valid_after(datetime.datetime(2030, 1, 1))
        )
        if san is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(san), critical=False
            )
        return builder.sign(key, hashes.SHA256())

    def test_never_the_common_name(self):
        """
        Without a SAN there is no name, whatever the CN says.
        """
        self.assertEqual(dns_names(self.certificate("calgary-01")), frozenset())

    def test_san_only(self):
        """
        The DNS names of the SAN, lower-cased; not the CN, not IP addresses,
        not e-mail addresses.
        """
        cert = self.certificate(
            "calgary-01",
            [
                x509.DNSName("Zurich-01"),
                x509.DNSName("zurich-01.clavitor.ai"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.RFC822Name("calgary-01@clavitor.ai"),
            ],
        )
        self.assertEqual(
            dns_names(cert), frozenset(["zurich-01", "zurich-01.clavitor.ai"])
        )


@implementer(IHandshakeListener)
class Recorder(Protocol):
    """
    One end of a test connection.  C{settled} fires when the TLS handshake
    completes, C{outcome} then being the peer's certificate, or when the
    connection is lost before, C{outcome} then being the reason; C{lost}
    fires when the connection is lost, C{reason} being why.
    """

    def __init__(self):
        self.settled = Deferred()
        self.lost = Deferred()
        self.outcome = self.reason = None

    def handshakeCompleted(self):
        self.outcome = peer_certificate(self.transport)
        self.settled.callback(None)

    def connectionLost(self, reason):
        self.reason = reason
        if not self.settled.called:
            self.outcome = reason
            self.settled.callback(None)
        self.lost.callback(None)


class OneConnection(Factory):
    def __init__(self):
        self.built = Deferred()

    def buildProtocol(self, addr):
        recorder = Recorder()
        self.built.callback(recorder)
        return recorder


class LoopbackTests(TestCase):
    """
    Real TLS between server_options and BackupPolicy over 127.0.0.1.
    """

    def setUp(self):
        self.pki = PKIFiles(self.mktemp())
        self.ca = self.pki.ca()
        self.backup = self.pki.identity("zurich-01", ips=["127.0.0.1"])
        self.primary = self.pki.identity("calgary-01")

    @inlineCallbacks
    def connect(self, options, creator, host="127.0.0.1"):
        """
        Listen with C{options}, connect with C{creator}, and wait until both
        ends have finished or failed their handshake: C{(server, client)}.
        """
        factory = OneConnection()
        port = yield SSL4ServerEndpoint(
            reactor, 0, options, interface="127.0.0.1"
        ).listen(factory)
        self.addCleanup(port.stopListening)
        if creator is None:
            creator = BackupPolicy(self.ca, self.primary, "zurich-01").creatorForNetloc(
                host.encode("ascii"), port.getHost().port
            )
        client = Recorder()
        yield connectProtocol(
            wrapClientTLS(
                creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
            ),
            client,
        )
        server = yield factory.built
        self.addCleanup(lambda: client.lost)
        self.addCleanup(lambda: server.lost)
        self.addCleanup(client.transport.loseConnection)
        yield server.settled
        yield client.settled
        return server, client

    def setEnvironment(self, name, value):
        """
        Set a variable in the process environment (where OpenSSL reads it)
        for this test.
        """
        old = os.environ.get(name)
        os.environ[name] = value
        if old is None:
            self.addCleanup(os.environ.pop, name)
        else:
            self.addCleanup(os.environ.__setitem__, name, old)

    def mtls(self):
        return server_options(self.backup, self.ca, require_client_certificate=True)

    def assertHandshakeFailed(self, end, *errors):
        self.assertIsInstance(end.outcome, Failure)
        self.assertTrue(end.outcome.check(*errors), end.outcome)

    def assertOpenSSLReason(self, end, text):
        self.assertHandshakeFailed(end, SSL.Error)
        self.assertIn(text, str(end.outcome.value))

    @inlineCallbacks
    def test_mtls(self):
        """
        Both ends verify each other; the server learns the client's pop_id
        from its certificate, over TLS 1.3.
        """
        server, client = yield self.connect(self.mtls(), None)
        self.assertIsInstance(server.outcome, x509.Certificate)
        self.assertIn("calgary-01", dns_names(server.outcome))
        self.assertEqual(server.outcome, self.primary.certificate)
        self.assertEqual(client.outcome, self.backup.certificate)
        self.assertEqual(
            server.transport.getHandle().get_protocol_version_name(), "TLSv1.3"
        )

    @inlineCallbacks
    def test_server_dns_name(self):
        """
        The client accepts a server named by a DNS name in its SAN.
        """
        server, client = yield self.connect(self.mtls(), None, host="zurich-01")
        self.assertEqual(client.outcome, self.backup.certificate)

    @inlineCallbacks
    def test_client_certificate_from_other_ca(self):
        """
        A client certificate with the same subject and SAN from another CA
        of the same name is refused at the handshake.
        """
        impostor = PKIFiles(self.mktemp()).identity("calgary-01")
        self.assertEqual(impostor.certificate.subject, self.primary.certificate.subject)
        self.assertEqual(impostor.certificate.issuer, self.primary.certificate.issuer)
        creator = BackupPolicy(self.ca, impostor, "zurich-01").creatorForNetloc(b"127.0.0.1", 0)
        server, client = yield self.connect(self.mtls(), creator)
        self.assertOpenSSLReason(server, "certificate verify failed")
        yield client.lost
        self.assertIsInstance(client.reason.value, SSL.Error)

    @inlineCallbacks
    def test_no_client_certificate(self):
        """
        In mtls mode a client without a certificate is refused.
        """
        creator = BackupPolicy(self.ca, None, "zurich-01").creatorForNetloc(b"127.0.0.1", 0)
        server, client = yield self.connect(self.mtls(), creator)
        self.assertOpenSSLReason(server, "peer did not return a certificate")

    @inlineCallbacks
    def test_trusts_only_the_ca_not_the_system_store(self):
        """
        With the other CA in OpenSSL's default trust (SSL_CERT_FILE), a
        client certificate from it is still refused: the default paths are
        never loaded.
        """
        other = PKIFiles(self.mktemp())
        self.setEnvironment("SSL_CERT_FILE", other.ca_path)
        creator = BackupPolicy(self.ca, other.identity("calgary-01"), "zurich-01").creatorForNetloc(
            b"127.0.0.1", 0
        )
        server, client = yield self.connect(self.mtls(), creator)
        self.assertOpenSSLReason(server, "certificate verify failed")

    @inlineCallbacks
    def test_client_trusts_only_the_ca_not_the_system_store(self):
        """
        The primary refuses a backup certificate from a CA that is in
        OpenSSL's default trust but is not the configured CA.
        """
        other = PKIFiles(self.mktemp())
        self.setEnvironment("SSL_CERT_FILE", other.ca_path)
        impostor = other.identity("zurich-01", ips=["127.0.0.1"])
        options = server_options(impostor, self.ca, require_client_certificate=True)
        server, client = yield self.connect(options, None)
        self.assertOpenSSLReason(client, "certificate verify failed")

    @inlineCallbacks
    def test_bearer_mode_asks_for_no_certificate(self):
        """
        Without require_client_certificate the server asks for none, so even
        a client that has one connects without presenting it.
        """
        options = server_options(self.backup, self.ca, require_client_certificate=False)
        server, client = yield self.connect(options, None)
        self.assertIsNone(server.outcome)
        self.assertEqual(client.outcome, self.backup.certificate)

    @inlineCallbacks
    def test_tls12_client_refused(self):
        """
        A client that speaks at most TLS 1.2 is refused by the server.
        """
        creator = ssl.optionsForClientTLS(
            "127.0.0.1",
            trustRoot=self.ca,
            clientCertificate=self.primary.twisted,
            extraCertificateOptions={"lowerMaximumSecurityTo": ssl.TLSVersion.TLSv1_2},
        )
        server, client = yield self.connect(self.mtls(), creator)
        self.assertOpenSSLReason(server, "unsupported protocol")

    @inlineCallbacks
    def test_tls12_server_refused(self):
        """
        The primary refuses a backup that speaks at most TLS 1.2.
        """
        options = ssl.CertificateOptions(
            privateKey=self.backup.twisted.privateKey.original,
            certificate=self.backup.twisted.original,
            lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2,
        )
        server, client = yield self.connect(options, None)
        self.assertOpenSSLReason(client, "alert protocol version")

    @inlineCallbacks
    def test_server_named_for_another_host(self):
        """
        A backup certificate from the CA that does not name the address we
        connect to fails verification at the client.
        """
        elsewhere = self.pki.identity("elsewhere", hosts=["elsewhere.clavitor.ai"])
        options = server_options(elsewhere, self.ca, require_client_certificate=True)
        server, client = yield self.connect(options, None)
        self.assertHandshakeFailed(client, VerificationError)
        self.assertHandshakeFailed(server, Exception)

    @inlineCallbacks
    def test_server_dns_name_mismatch(self):
        """
        Connecting to a DNS name the backup certificate lacks fails too.
        """
        server, client = yield self.connect(self.mtls(), None, host="geneva-01")
        self.assertHandshakeFailed(client, VerificationError)

    @inlineCallbacks
    def test_server_not_named_backup_pop_id(self):
        """
        A certificate from the CA that names the host we connect to but not
        the backup's pop_id (another POP standing in for the backup) is
        refused by the client before any request.
        """
        stand_in = self.pki.identity("evil-01", ips=["127.0.0.1"])
        options = server_options(stand_in, self.ca, require_client_certificate=True)
        server, client = yield self.connect(options, None)
        yield client.lost
        self.assertTrue(client.reason.check(VerificationError), client.reason)
        self.assertIn("zurich-01", str(client.reason.value))

    @inlineCallbacks
    def test_server_from_other_ca(self):
        """
        A backup certificate with the right names from another CA is refused.
        """
        impostor = PKIFiles(self.mktemp()).identity("zurich-01", ips=["127.0.0.1"])
        options = server_options(impostor, self.ca, require_client_certificate=True)
        server, client = yield self.connect(options, None)
        self.assertOpenSSLReason(client, "certificate verify failed")

    def test_policy_interface(self):
        verifyObject(IPolicyForHTTPS, BackupPolicy(self.ca, None, "zurich-01"))


class TrackedChannel(HTTPChannel):
    """
    An HTTP channel that tells its site when its connection is gone, so a
    test can wait for the server side to close.
    """

    def connectionMade(self):
        super().connectionMade()
        self.closed = Deferred()
        self.site.closed.append(self.closed)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.closed.callback(None)


class PeerNames(Resource):
    """
    Answers the DNS names of the verified client certificate, found the way
    the receiver finds it: C{peer_certificate(request.channel.transport)}.
    """

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.requests = 0

    def render_GET(self, request):
        self.requests += 1
        cert = peer_certificate(request.channel.transport)
        names = None if cert is None else sorted(dns_names(cert))
        return json.dumps(names).encode("ascii")


class WebTests(TestCase):
    """
    BackupPolicy as the policy of a twisted.web Agent, against a Site served
    with server_options: what the sender and the receiver do.
    """

    def setUp(self):
        self.pki = PKIFiles(self.mktemp())
        self.ca = self.pki.ca()
        self.backup = self.pki.identity("zurich-01", ips=["127.0.0.1"])
        self.primary = self.pki.identity("calgary-01")

    @inlineCallbacks
    def get(self, require_client_certificate, client_identity):
        self.resource = PeerNames()
        site = Site(self.resource)
        site.protocol = TrackedChannel
        site.closed = []
        options = server_options(self.backup, self.ca, require_client_certificate)
        port = yield SSL4ServerEndpoint(
            reactor, 0, options, interface="127.0.0.1"
        ).listen(site)
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(lambda: gatherResults(site.closed))
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(
            reactor, contextFactory=BackupPolicy(self.ca, client_identity, "zurich-01"), pool=pool
        )
        url = "https://127.0.0.1:{}/".format(port.getHost().port).encode("ascii")
        response = yield agent.request(b"GET", url)
        self.assertEqual(response.code, 200)
        answer = yield readBody(response)
        return json.loads(answer)

    @inlineCallbacks
    def test_mtls_request(self):
        """
        The resource sees the primary's verified certificate.
        """
        names = yield self.get(True, self.primary)
        self.assertEqual(names, ["calgary-01"])

    @inlineCallbacks
    def test_bearer_request(self):
        """
        In bearer mode the request arrives without a client certificate.
        """
        names = yield self.get(False, None)
        self.assertIsNone(names)

    @inlineCallbacks
    def test_stand_in_backup_gets_no_request(self):
        """
        Another POP's certificate that names the backup's address is refused
        before the request is sent: the resource never sees it.
        """
        self.backup = self.pki.identity("evil-01", ips=["127.0.0.1"])
        failure = yield self.assertFailure(self.get(True, self.primary), Exception)
        self.assertEqual(self.resource.requests, 0)
        self.assertIn("VerificationError", repr(failure.reasons))
