"""The fleet's broker logins and ACL, as the generators for brokers without an acl_file read them.

`fledger keys nats-config` (:mod:`fledger.nats_auth`) and `fledger keys rabbitmq-definitions`
(:mod:`fledger.rabbitmq_auth`) both turn ``fledger/fledger.acl`` and the keys directory into the
broker's own users and permissions. What they share lives here:

- who gets a login: every ``user`` block of the ACL, every device with an active key in
  devices.json (user name = device id) and every prediction client with an active key in
  clients.json (its two ACL lines: :func:`fledger.acl.client_acl_text`); devices and clients
  whose keys are all revoked are listed apart (a generator may lock them out explicitly);
- each login's password: ``broker/<user>.password``; a user without one gets no login;
- :func:`filter_levels`: the checks every translation of an MQTT filter needs.

Only :func:`fleet_logins` reads files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fledger.acl import Acl, with_clients


class BrokerConfigError(ValueError):
    """The ACL or the fleet holds something the target broker's permissions cannot express."""


def filter_levels(topic_filter: str, forbidden: str, broker: str, why: str,
                  error: type[BrokerConfigError] = BrokerConfigError) -> list[str]:
    """The levels of an ACL filter, refused (``error``) if it holds a character of ``forbidden``
    (``why`` says what ``broker`` does with it), an empty level, or a ``#`` that is not the last
    level."""
    if not topic_filter or any(c in topic_filter for c in forbidden):
        raise error(f"ACL filter {topic_filter!r}: {broker} cannot express a topic with {why}")
    levels = topic_filter.split("/")
    if "" in levels:
        raise error(f"ACL filter {topic_filter!r}: empty topic levels are not supported here")
    if "#" in levels[:-1]:
        raise error(f"ACL filter {topic_filter!r}: '#' must be the last level")
    return levels


@dataclass
class FleetLogins:
    acl: Acl  # the ACL with one block per active prediction client
    passwords: dict[str, str]  # user -> password, for every user that gets a login
    skipped: list[str]  # users the ACL or a registry names but with no password file here
    revoked: list[str]  # devices and clients in a registry with no active key left: no login


def fleet_logins(directory: Path, acl_path: Path | None = None, *, broker: type[BrokerConfigError]) -> FleetLogins:
    """The logins of the fleet whose keys are in ``directory``, under the ACL in ``acl_path``
    (default: fledger's shipped one); ``broker``: the error a name clash raises."""
    from federation.keys import DeviceRegistry
    from federation.topics import check_name
    from fledger import keytool
    from fledger.acl import default_acl_text

    directory = Path(directory)
    source = str(acl_path or "fledger.acl")
    text = Path(acl_path).read_text() if acl_path is not None else default_acl_text()
    registry = DeviceRegistry.load(directory / keytool.REGISTRY_FILE)
    clients = DeviceRegistry.load(directory / keytool.CLIENTS_FILE)
    devices = [d for d in registry.devices if keytool.active_keys(registry, d)]
    client_names = [c for c in clients.devices if keytool.active_keys(clients, c)]
    base = Acl.parse(text, source)
    clash = (set(devices) | set(client_names)) & set(base.users)
    if clash:
        raise broker(f"{', '.join(sorted(clash))}: a device or client with the name of an ACL user block "
                     "would get that role's rights")
    users = sorted({*base.users, *devices, *client_names})
    revoked = sorted({*registry.devices, *clients.devices} - set(users))
    passwords: dict[str, str] = {}
    skipped: list[str] = []
    for user in users:
        check_name("broker user", user)
        password_file = directory / keytool.BROKER_DIR / f"{user}.password"
        if password_file.exists():
            passwords[user] = keytool.read_password_file(password_file)
        else:
            skipped.append(user)
    for user in revoked:
        check_name("broker user", user)
    return FleetLogins(Acl.parse(with_clients(text, client_names), source), passwords, skipped, revoked)


__all__ = ["BrokerConfigError", "FleetLogins", "filter_levels", "fleet_logins"]
