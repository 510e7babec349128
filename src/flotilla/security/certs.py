"""TLS and SuperNode-authentication material for a job, made with `cryptography`.

What Flower 1.41 expects (read from its source, not from older tutorials):

- SuperLink TLS: `flower-superlink --ssl-ca-certfile CA --ssl-certfile CERT
  --ssl-keyfile KEY` (PEM). One port serves Fleet, Control and runtime APIs,
  and the SuperLink's own flower-superexec connects back to 127.0.0.1:<port>
  with the CA: the server certificate must name 127.0.0.1.
- SuperNode authentication: `flower-superlink --enable-supernode-auth` (needs
  TLS); each SuperNode runs with `--auth-supernode-private-key KEY`, an
  OpenSSH-format private key on a NIST EC curve (P-384 here). There is no
  authorized-keys file any more (`--auth-list-public-keys` is rejected): a
  node's OpenSSH public key is registered through the Control API with
  `flwr supernode register KEY.pub CONNECTION`. An unregistered node is
  refused at activation and its SuperNode exits.

Layout of a bundle directory (private keys 0600, everything else 0644):
    ca.crt ca.key  superlink.crt superlink.key
    supernodes/<device>.key supernodes/<device>.pub
    bundle.json   SANs, devices, validity (no key material)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flotilla.errors import UserError

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"
SERVER_KEY = "superlink.key"
NODE_DIR = "supernodes"
MANIFEST = "bundle.json"

# Names every target reaches the SuperLink by; the job adds its own.
BASE_SANS = ("superlink", "localhost", "127.0.0.1", "::1")


class CertError(UserError):
    """Bad input for certificate making; one line naming what to fix."""


@dataclass(frozen=True)
class NodeKey:
    device: str
    private_key: Path  # OpenSSH EC private key (0600): --auth-supernode-private-key
    public_key: Path  # OpenSSH public key: `flwr supernode register`


@dataclass(frozen=True)
class CertBundle:
    dir: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sans: list[str]
    nodes: dict[str, NodeKey] = field(default_factory=dict)

    def node(self, device: str) -> NodeKey:
        try:
            return self.nodes[device]
        except KeyError:
            raise CertError(
                f"{self.dir}: no SuperNode key for device {device!r}; run `flotilla certs JOB` again"
            ) from None

    def private_files(self) -> list[Path]:
        return [self.ca_key, self.server_key, *(k.private_key for k in self.nodes.values())]

    def superlink_args(self, in_dir: str | None = None) -> list[str]:
        """flower-superlink flags for TLS + SuperNode auth; paths rebased on `in_dir` (a mount point)."""
        p = (lambda f: f"{in_dir}/{f.name}") if in_dir else str
        return [
            "--ssl-ca-certfile", p(self.ca_cert),
            "--ssl-certfile", p(self.server_cert),
            "--ssl-keyfile", p(self.server_key),
            "--enable-supernode-auth",
        ]


def default_sans(job_name: str, namespace: str | None = None, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """SANs that cover local, Swarm and Kubernetes addresses of a job's SuperLink."""
    ns = namespace or f"flotilla-{job_name}"
    names = [
        *BASE_SANS,
        f"{job_name}_superlink",  # swarm: <stack>_<service>
        "tasks.superlink",  # swarm dnsrr
        f"superlink.{ns}",
        f"superlink.{ns}.svc",
        f"superlink.{ns}.svc.cluster.local",
        *extra,
    ]
    return list(dict.fromkeys(names))


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    # Create with 0600 from the start: no window where the key is world-readable.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san_entries(sans: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for s in sans:
        s = s.strip()
        if not s:
            continue
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            if not all(part and len(part) < 64 for part in s.split(".")) or " " in s:
                raise CertError(f"SAN {s!r} is neither an IP address nor a DNS name") from None
            out.append(x509.DNSName(s))
    return out


def _make_ca(common_name: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Flotilla"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate clock skew between devices
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, sans: list[str], days: int
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(_san_entries(sans)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def cert_sans(cert: x509.Certificate) -> set[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in ext}


def _make_node_key(path_key: Path, path_pub: Path, device: str) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        path_key,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                          serialization.NoEncryption()),
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(path_pub, pub + f" flotilla-{device}\n".encode())


def make_certs(
    out_dir: str | Path,
    sans: list[str] | tuple[str, ...],
    devices: list[str] | tuple[str, ...],
    days: int = 365,
    force: bool = False,
) -> CertBundle:
    """Write (or complete) a bundle in `out_dir`.

    Existing material is kept so running federations stay valid: the CA is
    reused, the server certificate is reissued only when the SANs changed,
    and only devices without a key get one. `force` starts from scratch.
    """
    out = Path(out_dir)
    sans = list(dict.fromkeys(s.strip() for s in sans if s.strip()))
    if not sans:
        raise CertError("certs: give at least one SAN (a DNS name or IP the SuperLink is reached by)")
    if days < 1:
        raise CertError("certs: days must be at least 1")
    bad = [d for d in devices if not d or "/" in d or d.startswith(".")]
    if bad:
        raise CertError(f"certs: device name {bad[0]!r} cannot be a file name")
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)  # the directory holds private keys

    ca_cert_p, ca_key_p = out / CA_CERT, out / CA_KEY
    if force or not (ca_cert_p.is_file() and ca_key_p.is_file()):
        ca_key, ca_cert = _make_ca("Flotilla CA", days)
        _write_private(ca_key_p, _pem_key(ca_key))
        _write_public(ca_cert_p, ca_cert.public_bytes(serialization.Encoding.PEM))
        force = True  # a new CA invalidates everything it signed
    else:
        ca_key = serialization.load_pem_private_key(ca_key_p.read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate(ca_cert_p.read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{ca_key_p}: not an EC private key; remove the directory or pass --force")

    srv_cert_p, srv_key_p = out / SERVER_CERT, out / SERVER_KEY
    reissue = force or not (srv_cert_p.is_file() and srv_key_p.is_file())
    if not reissue:
        current = x509.load_pem_x509_certificate(srv_cert_p.read_bytes())
        wanted = {str(ipaddress.ip_address(s)) if _is_ip(s) else s for s in sans}
        reissue = cert_sans(current) != wanted or current.not_valid_after_utc <= _now() + dt.timedelta(days=1)
    if reissue:
        srv_key, srv_cert = _make_server_cert(ca_key, ca_cert, sans, days)
        _write_private(srv_key_p, _pem_key(srv_key))
        _write_public(srv_cert_p, srv_cert.public_bytes(serialization.Encoding.PEM))

    nodes: dict[str, NodeKey] = {}
    for device in dict.fromkeys(devices):
        k = NodeKey(device, out / NODE_DIR / f"{device}.key", out / NODE_DIR / f"{device}.pub")
        if force or not (k.private_key.is_file() and k.public_key.is_file()):
            _make_node_key(k.private_key, k.public_key, device)
        nodes[device] = k
    os.chmod(out / NODE_DIR, 0o700) if nodes else None

    (out / MANIFEST).write_text(json.dumps({
        "sans": sans,
        "devices": list(nodes),
        "ca_not_after": ca_cert.not_valid_after_utc.isoformat(),
        "ca_sha256": ca_cert.fingerprint(hashes.SHA256()).hex(),
    }, indent=2) + "\n")
    return CertBundle(out, ca_cert_p, ca_key_p, srv_cert_p, srv_key_p, sans, nodes)


def load_bundle(out_dir: str | Path) -> CertBundle:
    """A bundle written by make_certs; CertError naming the directory when incomplete."""
    out = Path(out_dir)
    try:
        meta = json.loads((out / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raise CertError(f"{out}: no certificate bundle here; make one with `flotilla certs JOB -o {out}`") from None
    nodes = {d: NodeKey(d, out / NODE_DIR / f"{d}.key", out / NODE_DIR / f"{d}.pub") for d in meta["devices"]}
    b = CertBundle(out, out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY, meta["sans"], nodes)
    missing = [p for p in (b.ca_cert, b.server_cert, b.server_key, *(k.private_key for k in nodes.values()),
                           *(k.public_key for k in nodes.values())) if not p.is_file()]
    if missing:
        raise CertError(f"{missing[0]}: missing from the bundle; run `flotilla certs JOB -o {out}` again")
    return b


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def private_key_markers(bundle: CertBundle) -> list[bytes]:
    """Byte strings that betray a private key of `bundle` in some other file (for leak checks)."""
    markers = [b"PRIVATE KEY-----"]
    for p in bundle.private_files():
        body = b"".join(line for line in p.read_bytes().splitlines() if not line.startswith(b"-----"))
        # Key files start with fixed headers (ASN.1, "openssh-key-v1"): take the middle, which is key bytes.
        mid = len(body) // 2
        markers.append(body[mid : mid + 32])
    return markers


def flwr_connection_toml(name: str, address: str, root_certificates: str | Path | None) -> str:
    """A `[superlink.NAME]` table for $FLWR_HOME/config.toml (TLS when a CA is given)."""
    lines = [f"[superlink.{name}]", f'address = "{address}"']
    if root_certificates:
        lines.append(f'root-certificates = "{Path(root_certificates).resolve()}"')
    else:
        lines.append("insecure = true")
    return "\n".join(lines) + "\n"


def _flwr_exe() -> str:
    here = Path(sys.executable).parent / "flwr"
    return str(here) if here.exists() else (shutil.which("flwr") or "flwr")


def register_nodes(control_address: str, bundle: CertBundle, devices: list[str] | None = None,
                   timeout: float = 60.0) -> dict[str, int]:
    """Register SuperNode public keys with a TLS SuperLink (`flwr supernode register`).

    Returns device -> node id. Keys already registered (e.g. a restarted
    driver) are not an error: they are reported with node id 0.
    """
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    out: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="flotilla-flwr-home-") as home:
        env["FLWR_HOME"] = home
        Path(home, "config.toml").write_text(flwr_connection_toml("target", control_address, bundle.ca_cert))
        for device in devices if devices is not None else list(bundle.nodes):
            key = bundle.node(device)
            proc = subprocess.run(
                [_flwr_exe(), "supernode", "register", str(key.public_key), "target", "--name", device,
                 "--format", "json"],
                env=env, capture_output=True, text=True, timeout=timeout,
            )
            node_id = _node_id(proc.stdout)
            if proc.returncode == 0 and node_id is not None:
                out[device] = node_id
            elif "already" in (proc.stdout + proc.stderr).lower():
                out[device] = 0
            else:
                why = (proc.stdout + proc.stderr).strip().splitlines()
                raise CertError(
                    f"registering SuperNode key of {device} at {control_address} failed: "
                    f"{why[-1] if why else 'exit ' + str(proc.returncode)}"
                )
    return out


def _node_id(stdout: str) -> int | None:
    # `--format json` pretty-prints one object over several lines.
    dec = json.JSONDecoder()
    i = stdout.find("{")
    while i != -1:
        try:
            doc, _ = dec.raw_decode(stdout, i)
        except json.JSONDecodeError:
            i = stdout.find("{", i + 1)
            continue
        if isinstance(doc, dict) and doc.get("success"):
            return int(doc.get("node-id", 0))
        return None
    return None
