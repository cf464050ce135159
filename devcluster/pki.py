"""The local cluster's certificates: one CA, the apiserver's serving certificate, client certificates
for each component, the service-account keys and self-contained kubeconfigs. Kept across ``up``s,
reissued when their server names change."""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import shutil
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devcluster import CLUSTER_NAME, SERVICE_IP, log


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)


def subject_name(common_name: str, organization: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _issue(
    pki: Path,
    stem: str,
    subject: x509.Name,
    *,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    server_names: list[str] | None = None,
    client: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    issuer_name, signing_key = (ca[0].subject, ca[1]) if ca else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650 if ca is None else 365))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca is None:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
            alt: list[x509.GeneralName] = []
            for name in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(name)))
                except ValueError:
                    alt.append(x509.DNSName(name))
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True
        )
    cert = builder.sign(signing_key, hashes.SHA256())
    (pki / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pki / f"{stem}.key", key)
    return cert, key


# Client identities: file stem → (common name, organization).
CLIENTS = {
    "admin": ("kubetune-admin", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
}


APISERVER_NAMES = [
    "127.0.0.1", "localhost", SERVICE_IP, "kubernetes", "kubernetes.default",
    "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
]


def ensure_pki(pki: Path) -> None:
    """CA, apiserver serving cert, client certs and the service-account key pair (kept across ups)."""
    wanted = ["ca.crt", "apiserver.crt", "sa.key", "sa.pub", *(f"{c}.crt" for c in CLIENTS)]
    if all((pki / name).is_file() for name in wanted):
        return
    log("generating certificates")
    shutil.rmtree(pki, ignore_errors=True)
    pki.mkdir(parents=True)
    ca = _issue(pki, "ca", subject_name("kubetune-local-ca"), ca=None)
    _issue(pki, "apiserver", subject_name("kube-apiserver"), ca=ca, server_names=APISERVER_NAMES)
    for stem, (cn, org) in CLIENTS.items():
        _issue(pki, stem, subject_name(cn, org), ca=ca, client=True)
    sa_key = ec.generate_private_key(ec.SECP256R1())
    _write_key(pki / "sa.key", sa_key)
    (pki / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def kubeconfig_text(server: str, pki: Path, client: str) -> str:
    """A self-contained kubeconfig (certificates embedded) as JSON, which is valid YAML."""

    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME, "cluster": {
            "server": server, "certificate-authority-data": b64("ca.crt")}}],
        "users": [{"name": client, "user": {
            "client-certificate-data": b64(f"{client}.crt"), "client-key-data": b64(f"{client}.key")}}],
        "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": client}}],
        "current-context": CLUSTER_NAME,
        "preferences": {},
    }
    return json.dumps(config, indent=2) + "\n"


def ensure_serving_cert(pki: Path, stem: str, names: list[str]) -> None:
    """A serving certificate signed by the cluster's CA (kept across ups, like the others)."""
    ensure_cert(pki, stem, subject_name(stem), server_names=names)


def _cert_names(path: Path) -> set[str]:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return set()
    return {str(name.value) for name in alt}


def ensure_cert(pki: Path, stem: str, subject: x509.Name, *, server_names: list[str] | None = None,
                client: bool = False) -> None:
    """A certificate signed by the cluster's CA, kept across ups unless its server names changed."""
    crt, key = pki / f"{stem}.crt", pki / f"{stem}.key"
    if crt.is_file() and key.is_file() and (not server_names or _cert_names(crt) == set(server_names)):
        return
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    _issue(pki, stem, subject, ca=(ca_cert, ca_key), server_names=server_names, client=client)
