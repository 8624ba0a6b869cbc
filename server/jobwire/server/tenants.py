"""Tenants' quotas and weights: defaults from flags, per-tenant overrides from the tenants file.

Where each one holds (docs/architecture.md, "Tenants"):

- ``weight``: fair sharing in the dispatcher's scheduler (``scheduler.py``);
- ``max_running``: the dispatcher (one process counts for the whole cluster: exact);
- ``max_queued``: every replica's queue view (like the global ``max_queued``: a burst spread over
  several replicas may pass it by the submits in flight);
- ``submit_rate``: a token bucket in the store, taken in the insert's transaction (exact across
  replicas).

The tenants file is TOML::

    [tenants.acme]
    weight = 3          # 3 starts for every 1 of a weight-1 tenant, when both have jobs waiting
    max_queued = 50000
    max_running = 20
    submit_rate = 6000  # jobs per minute

Any key left out takes the default (the ``--tenant-*`` flags).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any

from jobwire.server.access import check_tenant

MAX_WEIGHT = 1000.0


@dataclass(frozen=True, slots=True)
class TenantQuota:
    """One tenant's settings; None means no limit."""

    weight: float = 1.0
    max_queued: int | None = None
    max_running: int | None = None
    submit_rate: int | None = None  # jobs per minute; the bucket holds a minute's worth


class TenantPolicies:
    """The settings of every tenant: the defaults, and the tenants file's overrides."""

    def __init__(self, default: TenantQuota | None = None, overrides: dict[str, TenantQuota] | None = None):
        self.default = default or TenantQuota()
        self.overrides = dict(overrides or {})

    def quota(self, tenant: str) -> TenantQuota:
        return self.overrides.get(tenant, self.default)

    def weight(self, tenant: str) -> float:
        return self.quota(tenant).weight

    def max_running(self, tenant: str) -> int | None:
        return self.quota(tenant).max_running

    @property
    def limits_running(self) -> bool:
        """Whether any tenant has a running limit (the scheduler skips the check when none does)."""
        return self.default.max_running is not None or any(
            q.max_running is not None for q in self.overrides.values()
        )


def _check_quota(where: str, values: dict[str, Any], base: TenantQuota) -> TenantQuota:
    known = {f.name for f in fields(TenantQuota)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown setting {sorted(unknown)[0]!r} (use {', '.join(sorted(known))})")
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name == "weight":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_WEIGHT:
                raise ValueError(
                    f"{where}.weight: a number above 0 and at most {MAX_WEIGHT:g}, got {value!r}"
                )
            changes[name] = float(value)
        else:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{where}.{name}: a whole number, 0 for no limit, got {value!r}")
            changes[name] = value or None
    return replace(base, **changes)


def load_tenants_file(path: str, default: TenantQuota) -> dict[str, TenantQuota]:
    """The per-tenant overrides of a tenants file; ValueError in one line naming what is wrong."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: not valid TOML: {error}") from None
    extra = set(data) - {"tenants"}
    if extra:
        raise ValueError(f"{path}: unknown table {sorted(extra)[0]!r} (the file holds [tenants.NAME] tables)")
    tenants = data.get("tenants", {})
    if not isinstance(tenants, dict):
        raise ValueError(f"{path}: 'tenants' must be a table of [tenants.NAME] tables")
    overrides: dict[str, TenantQuota] = {}
    for name, values in tenants.items():
        where = f"{path}: tenants.{name}"
        try:
            check_tenant(name)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{where}: must be a table of settings")
        overrides[name] = _check_quota(where, values, default)
    return overrides
