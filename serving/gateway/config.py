"""The gateway's own typed settings (`--config gateway.yaml`), loaded once at start-up.

    limits:                       # each limit is a clear error and a count in medpipe_gateway_limit_rejections_total
      max_body_mb: 16             # request body (REST, enforced while streaming) and gRPC message size
      max_images: 64              # images per request
      rate_per_minute: 600        # per identity (token bucket; burst = rate_per_minute / 6)
      max_concurrent: 8           # predictions in flight; the rest queue ...
      queue_timeout_s: 5          # ... this long, then RESOURCE_EXHAUSTED / 429
      default_deadline_s: 30      # upstream deadline when the client sends none
      header_timeout_s: 10        # REST: a request's headers and body must arrive within this time ...
      idle_timeout_s: 5           # ... and an idle keep-alive connection is closed after this
      max_connections: 1024       # REST sockets at once, TLS handshakes and idle ones included (beyond: the
                                  # oldest idle one is closed; all busy: the newcomer is closed)
      accept_rate_per_s: 100      # new connections per client address per second (0 = no limit) ...
      accept_burst: 200           # ... with bursts of this many; beyond: closed at accept
      decode_workers: 2           # images are decoded in this many worker processes (serving/gateway/decode_pool.py)
      decode_memory_mb: 1024      # each worker's address-space limit (RLIMIT_AS); an image needing more: 422
      decode_timeout_s: 20        # one image's decode time limit (and never past the request's deadline): 422
      decode_max_tasks: 500       # a worker is replaced after this many images ...
      decode_recycle_mb: 256      # ... or when it keeps more resident memory than this after an image
    identities:                   # mTLS: certificate subject (RFC 4514, as `openssl x509 -subject -nameopt RFC2253`)
      "CN=radiology-viewer,O=Example Hospital": [predict:brain_mri]
    anonymous_scopes: ["predict:*", "metrics:read"]   # only with --allow-anonymous on loopback

Bearer tokens carry their own scopes (`scope` space-separated, or a `scopes` list). A certificate's scopes come
only from `identities`: a CA-signed certificate proves who the caller is, the gateway's operator decides what it may
call. A certificate subject that is not listed authenticates but may call nothing (403).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medpipe.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    max_body_mb: float = 16.0
    max_images: int = 64
    rate_per_minute: float = 600.0
    max_concurrent: int = 8
    queue_timeout_s: float = 5.0
    default_deadline_s: float = 30.0
    header_timeout_s: float = 10.0
    idle_timeout_s: float = 5.0
    max_connections: int = 1024
    decode_workers: int = 2
    decode_memory_mb: int = 1024
    decode_timeout_s: float = 20.0
    decode_max_tasks: int = 500
    decode_recycle_mb: int = 256
    accept_rate_per_s: float = 100.0
    accept_burst: float = 200.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


@dataclass(frozen=True)
class GatewayConfig:
    limits: Limits = field(default_factory=Limits)
    identities: dict = field(default_factory=dict)
    anonymous_scopes: tuple[str, ...] = ("predict:*", "metrics:read")


def load_gateway_config(path: str | None) -> GatewayConfig:
    """Defaults without a file; a ConfigError naming the file and key for an unknown key or a wrong type."""
    if not path:
        return GatewayConfig()
    import yaml

    from medpipe.config import _build  # the one typed YAML -> dataclass builder of the project

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"gateway config {file} does not exist (pass --config with a YAML file; see "
                          f"config/gateway.yaml)")
    raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: the top level must be a mapping")
    identities = raw.pop("identities", None) or {}
    if not isinstance(identities, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(s, str) for s in v)
            for k, v in identities.items()):
        raise ConfigError(f"{file}: identities must map certificate subjects to lists of scopes, "
                          f'e.g. "CN=viewer,O=Hospital": [predict:brain_mri]')
    config = _build(GatewayConfig, raw, str(file), "")
    limits = config.limits
    if limits.max_connections < 1 or limits.accept_rate_per_s < 0 or limits.header_timeout_s <= 0:
        raise ConfigError(f"{file}: limits.max_connections and header_timeout_s must be > 0, accept_rate_per_s >= 0")
    if limits.max_images < 1 or limits.max_concurrent < 1 or limits.max_body_mb <= 0 or limits.rate_per_minute <= 0:
        raise ConfigError(f"{file}: limits.max_images, max_concurrent, max_body_mb and rate_per_minute must be > 0")
    if limits.decode_workers < 1 or limits.decode_timeout_s <= 0 or limits.decode_max_tasks < 1:
        raise ConfigError(f"{file}: limits.decode_workers, decode_timeout_s and decode_max_tasks must be > 0")
    if 0 < limits.decode_memory_mb < 256:
        raise ConfigError(f"{file}: limits.decode_memory_mb={limits.decode_memory_mb} is below the 256 MB a decoder "
                          "needs for its libraries (0 = no limit)")
    return GatewayConfig(limits=limits, identities={k: tuple(v) for k, v in identities.items()},
                         anonymous_scopes=config.anonymous_scopes)
