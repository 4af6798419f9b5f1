"""The files in deploy/, checked with the real tools where this machine has them.

No Docker engine or running systemd is needed: nginx parses both nginx configurations
(``nginx -t``), ``systemd-analyze verify`` reads both units, and the container's
entrypoint script runs for real against ``bastion init`` (only ``bastion serve`` is
replaced, by a recorder) — so a config the image would write and then refuse to
serve, or an nginx file that does not parse, fails here rather than on a customer's
host. What still needs an engine: building the image and the compose file's wiring.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bastion.settings import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PROXY_SNIPPET = DEPLOY / "nginx" / "bastion-proxy.conf"
BASTION = Path(sys.executable).with_name("bastion")


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chat.example.org")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def _nginx_test(directory: Path, site: str) -> subprocess.CompletedProcess[str]:
    """``nginx -t`` of ``site`` included in a minimal main configuration."""
    (directory / "site.conf").write_text(site)
    main = directory / "nginx.conf"
    main.write_text(
        f"pid {directory}/nginx.pid;\nerror_log {directory}/error.log;\nevents {{}}\n"
        f"http {{\n    access_log off;\n    include {directory}/site.conf;\n}}\n"
    )
    return subprocess.run(["nginx", "-t", "-p", str(directory), "-c", str(main)], capture_output=True, text=True)


needs_nginx = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")


@needs_nginx
def test_nginx_example_config_parses(tmp_path: Path) -> None:
    """deploy/nginx/bastion.conf with its certificate paths pointed at a throwaway certificate."""
    cert, key = _self_signed(tmp_path)
    site = (DEPLOY / "nginx" / "bastion.conf").read_text()
    for placeholder, real in (
        ("/etc/ssl/certs/chat.example.org.pem", str(cert)),
        ("/etc/ssl/private/chat.example.org.key", str(key)),
        ("/etc/nginx/snippets/bastion-proxy.conf", str(PROXY_SNIPPET)),
    ):
        assert placeholder in site
        site = site.replace(placeholder, real)
    result = _nginx_test(tmp_path, site)
    assert result.returncode == 0, result.stderr


@needs_nginx
def test_nginx_compose_config_parses(tmp_path: Path) -> None:
    """deploy/docker/nginx.conf; the compose service name is replaced by an address,
    since nginx resolves upstream names when it reads its configuration."""
    site = (DEPLOY / "docker" / "nginx.conf").read_text()
    assert "server bastion:8008" in site
    site = site.replace("server bastion:8008", "server 127.0.0.1:8008")
    site = site.replace("/etc/nginx/snippets/bastion-proxy.conf", str(PROXY_SNIPPET))
    result = _nginx_test(tmp_path, site)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["bastion.service", "bastion@.service"])
def test_systemd_units_verify(tmp_path: Path, unit: str) -> None:
    """``systemd-analyze verify`` of each unit, its ExecStart pointed at this venv's bastion."""
    text = (DEPLOY / "systemd" / unit).read_text()
    assert "/opt/bastion/.venv/bin/bastion" in text
    path = tmp_path / unit
    path.write_text(text.replace("/opt/bastion/.venv/bin/bastion", str(BASTION)))
    target = tmp_path / (unit.replace("@.", "@8008.") if "@" in unit else unit)
    result = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_entrypoint_writes_a_secure_config_the_server_accepts(tmp_path: Path) -> None:
    """The image's entrypoint on first start (config written from the environment) and
    on a restart (config kept as it is), with the real ``bastion init``."""
    data_dir = tmp_path / "data"
    etc = tmp_path / "etc"
    etc.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorded = tmp_path / "serve-args"
    shim = bin_dir / "bastion"
    # The image's data directory is /var/lib/bastion: here a temporary one. `serve` is
    # recorded instead of run (it would need PostgreSQL and Redis at the compose names).
    shim.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys\n"
        f"args = [a.replace('/var/lib/bastion', {str(data_dir)!r}) for a in sys.argv[1:]]\n"
        "if args[0] == 'serve':\n"
        f"    open({str(recorded)!r}, 'a').write(' '.join(args) + '\\n')\n"
        "    sys.exit(0)\n"
        f"sys.exit(subprocess.call([{str(BASTION)!r}, *args]))\n"
    )
    shim.chmod(0o755)
    config = etc / "bastion.yaml"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "BASTION_CONFIG": str(config),
        "BASTION_SERVER_NAME": "chat.example.org",
        "BASTION_DATABASE_URL": "postgresql://bastion:secret@postgres/bastion",
        "BASTION_REDIS_URL": "redis://redis:6379/0",
    }
    script = DEPLOY / "docker" / "entrypoint.sh"
    first = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    assert recorded.read_text().splitlines() == ["serve --workers 2"]

    settings = load_settings(config)
    assert settings.server_name == "chat.example.org"
    assert settings.database.dialect == "postgres"
    assert settings.redis.resolved_url() == "redis://redis:6379/0"  # required with --workers 2
    assert settings.listen.host == "0.0.0.0" and settings.listen.port == 8008
    assert settings.metrics.enabled and settings.metrics.listen.port == 9108
    assert settings.trusted_proxies == ["172.16.0.0/12"]
    assert not settings.registration.enabled
    assert not any(net in ("0.0.0.0/0", "::/0") for net in settings.admin_api.allowed_networks)
    assert (etc / "kek.json").stat().st_mode & 0o077 == 0
    check = subprocess.run([str(BASTION), "check-config", "--config", str(config)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    written = config.read_bytes()
    again = subprocess.run(["sh", str(script)], env={**env, "BASTION_WORKERS": "3"}, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert config.read_bytes() == written  # a restart keeps the secrets it generated
    assert recorded.read_text().splitlines() == ["serve --workers 2", "serve --workers 3"]
