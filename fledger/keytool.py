"""``fledger keys``: provision the fleet's coordinator keys and per-device bundles."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from federation.durable import atomic_write, atomic_write_many
from federation.keys import SECRET_MODE, CoordinatorKeys, DeviceBundle, DeviceRegistry, secret_json, write_secret_json
from federation.topics import check_name

COORDINATOR_FILE = "coordinator.json"
REGISTRY_FILE = "devices.json"
BROKER_DIR = "broker"  # the embedded broker's password file and one password file per broker user
BROKER_PASSWORDS = "passwords"
# Broker users that are roles, not devices (fledger/fledger.acl). A device's broker user is
# its id, so a device with one of these ids would get that role's rights.
ROLE_USERS = ("coordinator", "monitor", "operator", "owner")
CLIENTS_FILE = "clients.json"  # prediction clients: a registry of their own, apart from the devices
RESERVED_CLIENT_NAMES = ROLE_USERS  # broker user names of other roles


def bundle_path(directory: Path, device: str) -> Path:
    return Path(directory) / f"device-{device}.json"


def init_fleet(directory: Path, fleet: str, *, force: bool = False) -> CoordinatorKeys:
    check_name("fleet", fleet)
    path = Path(directory) / COORDINATOR_FILE
    registry = Path(directory) / REGISTRY_FILE
    for existing in (path, registry):
        if existing.exists() and not force:
            raise FileExistsError(f"{existing} exists; refusing to replace the fleet's keys and device registry "
                                  "(use --force: every device then needs a new bundle)")
    keys = CoordinatorKeys.generate(fleet)
    keys.save(path)
    DeviceRegistry().save(Path(directory) / REGISTRY_FILE)
    for user in ROLE_USERS:
        new_broker_user(Path(directory) / BROKER_DIR, user)
    return keys


def broker_password_db(directory: Path) -> Path:
    """The embedded broker's password file of the fleet in ``directory`` (`fledger broker` uses it)."""
    return Path(directory) / BROKER_DIR / BROKER_PASSWORDS


def new_broker_user(broker_dir: Path, user: str) -> Path:
    """A random password for broker ``user``: written to ``broker_dir/<user>.password`` (0600,
    what the client's --password-file reads) and its hash to ``broker_dir/passwords``."""
    password = secrets.token_urlsafe(24)
    path = Path(broker_dir) / f"{check_name('broker user', user)}.password"
    atomic_write(path, (password + "\n").encode(), mode=0o600)
    write_broker_password(Path(broker_dir) / BROKER_PASSWORDS, user, password, generated=True)
    return path


def _broker_password_lines(path: Path) -> list[str]:
    return [ln for ln in Path(path).read_text().splitlines() if ln.strip()] if Path(path).exists() else []


def broker_users(directory: Path) -> set[str]:
    """The user names in the fleet's broker password file."""
    return {line.split(":", 1)[0] for line in _broker_password_lines(broker_password_db(directory))}


def check_device_id(directory: Path, device: str) -> str:
    """``device`` as a new device id: valid, and not the name of another broker user (a role,
    or a user in the fleet's broker password file that is no device)."""
    check_name("device id", device)
    if device.casefold() in ROLE_USERS:
        raise ValueError(f"device id {device!r} is reserved: it is the broker user of a role "
                         f"({', '.join(ROLE_USERS)}) and would get that role's rights")
    registry = DeviceRegistry.load(Path(directory) / REGISTRY_FILE)
    _check_not_other_user(directory, device, registry, broker_users(directory))
    return device


def _check_not_other_user(directory: Path, device: str, registry: DeviceRegistry, users: set[str]) -> None:
    if device not in registry.devices and device in users:
        raise ValueError(f"device id {device!r} is already a broker user in {broker_password_db(directory)} that "
                         "is no device: a device with this id would get that user's rights")


def _new_bundle(directory: Path, device: str) -> tuple[DeviceBundle, bytes]:
    from federation import crypto

    keys = CoordinatorKeys.load(Path(directory) / COORDINATOR_FILE)
    seed, public = crypto.ed25519_generate()
    return DeviceBundle(keys.fleet, device, seed, keys.public, keys.model_key_id, keys.model_key), public


def active_clients(directory: Path) -> tuple[str, ...]:
    """The prediction clients of the fleet in ``directory`` with an active key (clients.json)."""
    clients = DeviceRegistry.load(Path(directory) / CLIENTS_FILE)
    return tuple(sorted(c for c in clients.devices if active_keys(clients, c)))


def active_keys(registry: DeviceRegistry, device: str) -> list[str]:
    record = registry.devices.get(device)
    if record is None:
        return []
    return sorted(k for k in record.keys if k not in record.revoked)


def add_device(directory: Path, device: str, *, force: bool = False) -> tuple[Path, str]:
    """Create a device's signing key and bundle (0600), and register its public key.

    Refuses (FileExistsError) when the device already has a bundle here or an active key in
    the registry: replacing a device's key is `rotate`, which also revokes the old key. With
    ``force`` it does exactly that (the previous active keys are revoked). A new device also
    gets a broker password (``broker/<device>.password``, and its hash in ``broker/passwords``)."""
    check_name("device id", device)
    if force and active_keys(DeviceRegistry.load(Path(directory) / REGISTRY_FILE), device):
        check_device_id(directory, device)
        new_path, key_id, _revoked = rotate_device_key(directory, device)
        return new_path, key_id
    return add_devices(directory, [device], force=force)[0]


def device_ids(prefix: str, count: int, start: int = 1) -> list[str]:
    """``count`` device ids ``<prefix><number>``, numbers zero-padded to one width (dev-0001...)."""
    if count < 1:
        raise ValueError(f"--count must be at least 1, not {count}")
    width = len(str(start + count - 1))
    return [f"{prefix}{n:0{width}d}" for n in range(start, start + count)]


def read_device_list(path: Path) -> list[str]:
    """Device ids from a file: one per line; blank lines and '#' comments ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read device list {path}: {exc}") from exc
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def add_devices(directory: Path, devices: list[str], *, force: bool = False) -> list[tuple[Path, str]]:
    """:func:`add_device` for many devices at once: every id is checked before anything is
    written (one bad id refuses the whole batch), then the bundles and broker password files
    are written together and devices.json and broker/passwords are rewritten once, not once
    per device. Returns (bundle path, key id) per device, in order."""
    from federation import crypto

    directory = Path(directory)
    if len(set(devices)) != len(devices):
        duplicate = next(d for d in devices if devices.count(d) > 1)
        raise ValueError(f"device id {duplicate!r} is listed twice")
    registry_path = directory / REGISTRY_FILE
    registry = DeviceRegistry.load(registry_path)
    clients = DeviceRegistry.load(directory / CLIENTS_FILE).devices
    users = broker_users(directory)
    for device in devices:
        check_name("device id", device)
        if device in clients:
            raise ValueError(f"{device!r} is a prediction client of this fleet; a device needs a name of its own")
        if device.casefold() in ROLE_USERS:
            raise ValueError(f"device id {device!r} is reserved: it is the broker user of a role "
                             f"({', '.join(ROLE_USERS)}) and would get that role's rights")
        _check_not_other_user(directory, device, registry, users)
        if bundle_path(directory, device).exists() and not force:
            raise FileExistsError(f"{bundle_path(directory, device)} exists; refusing to overwrite the bundle of "
                                  f"{device} (`fledger keys rotate` replaces a device's key; or use --force)")
        current = active_keys(registry, device)
        if current:
            raise FileExistsError(f"device {device} already has active key(s) {', '.join(current)}; "
                                  "`fledger keys rotate` replaces a device's key (or use --force)")
    keys = CoordinatorKeys.load(directory / COORDINATOR_FILE)
    broker_dir = directory / BROKER_DIR
    files: list[tuple[Path, bytes, int]] = []
    hashes: dict[str, str] = {}
    added: list[tuple[Path, str]] = []
    for device in devices:
        seed, public = crypto.ed25519_generate()
        bundle = DeviceBundle(keys.fleet, device, seed, keys.public, keys.model_key_id, keys.model_key)
        path = bundle_path(directory, device)
        files.append((path, secret_json(bundle.to_json()), SECRET_MODE))
        added.append((path, registry.add(device, public)))
        password_path = broker_dir / f"{device}.password"
        if not password_path.exists():
            password = secrets.token_urlsafe(24)
            files.append((password_path, (password + "\n").encode(), SECRET_MODE))
            hashes[device] = hash_password(password, generated=True)
    # Secrets first: a crash before devices.json is written leaves bundles nobody accepts yet,
    # never a registered key without its bundle.
    atomic_write_many(files)
    if hashes:
        _write_password_hashes(broker_password_db(directory), hashes)
    registry.save(registry_path)
    return added


def client_bundle_path(directory: Path, client: str) -> Path:
    return Path(directory) / f"client-{client}.json"


def add_client(directory: Path, client: str) -> tuple[Path, str]:
    """Create a prediction client's signing key and bundle (0600; no fleet model key), and
    register its public key in clients.json. A client is not a device: a name used by a device
    (or by another role's broker user) is refused, so the two registries never share a name."""
    from federation import crypto
    from federation.prediction_wire import ClientBundle

    check_name("client id", client)
    if client.casefold() in RESERVED_CLIENT_NAMES:
        raise ValueError(f"{client!r} is the broker user of another role; choose another client id")
    if client in DeviceRegistry.load(Path(directory) / REGISTRY_FILE).devices:
        raise ValueError(f"{client!r} is a device of this fleet; a prediction client needs a name of its own")
    path = client_bundle_path(directory, client)
    registry_path = Path(directory) / CLIENTS_FILE
    registry = DeviceRegistry.load(registry_path)
    if path.exists() or active_keys(registry, client):
        raise FileExistsError(f"client {client} already has a bundle or an active key in {registry_path}")
    keys = CoordinatorKeys.load(Path(directory) / COORDINATOR_FILE)
    seed, public = crypto.ed25519_generate()
    ClientBundle(keys.fleet, client, seed, keys.public).save(path)
    key_id = registry.add(client, public)
    registry.save(registry_path)
    if (Path(directory) / BROKER_DIR).is_dir():  # a fleet made with broker logins: one for the client too
        new_broker_user(Path(directory) / BROKER_DIR, client)
    return path, key_id


def rotate_device_key(directory: Path, device: str) -> tuple[Path, str, list[str]]:
    """Give ``device`` a new Ed25519 key: a new bundle (0600, replacing the old one), the new
    public key registered, and every previously active key of the device revoked.

    Returns (bundle path, new key id, revoked key ids). The coordinator records the new key
    (``device.key``) and the revocations (``device.key_revoked``) in the ledger at its next
    start, and from then on rejects the old keys' updates as ``revoked_key``."""
    check_name("device id", device)
    registry_path = Path(directory) / REGISTRY_FILE
    registry = DeviceRegistry.load(registry_path)
    old = active_keys(registry, device)
    if device not in registry.devices:
        raise KeyError(f"device {device!r} is not registered in {registry_path} (use add-device)")
    bundle, public = _new_bundle(directory, device)
    key_id = registry.add(device, public)
    for old_id in old:
        registry.revoke(device, old_id)
    # The new bundle first: if the registry cannot be written afterwards, a re-run makes
    # another key and still revokes the old one (nothing is revoked without its successor).
    path = bundle_path(directory, device)
    bundle.save(path)
    registry.save(registry_path)
    return path, key_id, old


def revoke_device_key(directory: Path, device: str, key_id: str) -> None:
    registry = DeviceRegistry.load(Path(directory) / REGISTRY_FILE)
    registry.revoke(device, key_id)
    registry.save(Path(directory) / REGISTRY_FILE)


# Argon2id cost of the hash of a password the key tool generated itself: 24 random bytes
# (192 bits) cannot be guessed whatever the hash costs, so stretching buys nothing there, while
# the default cost (64 MiB, 3 passes: ~0.2 s) made provisioning 1,000 devices take minutes and
# costs the broker ~0.1-0.2 s of its event loop per login. Passwords a person chose (`keys
# broker-password`) keep the library's default cost. The parameters travel in each hash, so
# a broker verifies both kinds alike.
GENERATED_ARGON2_TIME_COST = 1
GENERATED_ARGON2_MEMORY_KIB = 1024


def hash_password(password: str, *, generated: bool = False) -> str:
    """An argon2 hash in the form amqtt's FileAuthPlugin reads (``user:hash`` lines). pwdlib is a
    plain dependency (not the broker extra): `keys init` makes a fleet's logins on any install.
    ``generated``: the password is a random token from this tool (see GENERATED_ARGON2_TIME_COST)."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    hasher = Argon2Hasher(time_cost=GENERATED_ARGON2_TIME_COST, memory_cost=GENERATED_ARGON2_MEMORY_KIB,
                          parallelism=1) if generated else Argon2Hasher()
    return PasswordHash((hasher,)).hash(password)


def write_broker_password(path: Path, user: str, password: str, *, generated: bool = False) -> None:
    """Append/replace ``user`` in an amqtt password file (``user:argon2-hash`` lines), 0600,
    replaced atomically (a reader never sees a half-written file)."""
    check_name("broker user", user)
    if not password or "\n" in password or "\r" in password:
        raise ValueError("a broker password must be one non-empty line")
    _write_password_hashes(Path(path), {user: hash_password(password, generated=generated)})


def _write_password_hashes(path: Path, hashes: dict[str, str]) -> None:
    """Set the hashes of ``hashes``' users in the password file at ``path``: one rewrite for all."""
    lines = [ln for ln in _broker_password_lines(path) if ln.split(":", 1)[0] not in hashes]
    lines.extend(f"{user}:{digest}" for user, digest in hashes.items())
    atomic_write(path, ("\n".join(lines) + "\n").encode(), mode=0o600)


def read_password_file(path: Path) -> str:
    """The password in ``path`` (first line, surrounding whitespace stripped)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read password file {path}: {exc}") from exc
    lines = text.splitlines()
    password = lines[0].strip() if lines else ""
    if not password:
        raise ValueError(f"password file {path} is empty")
    return password


def add_parser(sub: Any) -> None:
    p = sub.add_parser("keys", help="create fleet and device keys",
                       description="Provision keys. Secret files are written with 0600 permissions.")
    p.add_argument("--dir", type=Path, default=Path("keys"), help="key directory (default: ./keys)")
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    a = ks.add_parser("init", help="create the coordinator's keys for a new fleet",
                      description="Create coordinator.json (signing, decryption and fleet model keys), an empty "
                                  "devices.json, and broker logins for the roles: broker/passwords (what `fledger "
                                  "broker` enforces, with the ACL) and broker/{coordinator,monitor,operator}.password "
                                  "(each client's --password-file). Every file is 0600.")
    a.add_argument("--fleet", required=True, help="fleet name")
    a.add_argument("--force", action="store_true", help="replace existing keys (devices must be re-provisioned)")
    a = ks.add_parser("add-device", help="create device key bundles and register their public keys",
                      description="Create device-DEVICE.json (0600), register its public key in devices.json and "
                                  "give it a broker login (broker/DEVICE.password; its hash in broker/passwords). "
                                  "The device id is its broker user name, so role names (coordinator, monitor, "
                                  "operator) and other broker users' names are refused. Many devices at once: "
                                  "several ids, --count N --prefix P (P0001...PN), or --from-file FILE (one id a "
                                  "line); every id is checked first, and the registry and password file are "
                                  "rewritten once for the batch (1,000 devices take a few seconds).")
    a.add_argument("device", nargs="*", help="device id(s) (letters, digits, '_' and '-'; not a role's name)")
    a.add_argument("--count", type=int, default=0, help="add this many devices named PREFIX + number")
    a.add_argument("--prefix", default="device-", help="name prefix for --count (default: device-)")
    a.add_argument("--start", type=int, default=1, help="first number for --count (default: 1)")
    a.add_argument("--from-file", type=Path, help="add the device ids listed in this file, one a line")
    a.add_argument("--force", action="store_true",
                   help="replace an existing bundle; the device's previous keys are revoked (as rotate; "
                        "one device only)")
    a = ks.add_parser("add-client", help="create a prediction client's key bundle and register it (clients.json)",
                      description="Create CLIENT's Ed25519 key: a bundle client-CLIENT.json (0600) for `fledger "
                                  "predict --remote`, without the fleet model key, and its public key in "
                                  "clients.json (the coordinator's --clients; re-read within 2 s). Clients are kept "
                                  "apart from devices: a client cannot send updates, a device cannot buy "
                                  "predictions, and no name is both.")
    a.add_argument("client", help="client id (letters, digits, '_' and '-'); its broker user name too")
    a = ks.add_parser("rotate", help="give a device a new key and revoke its old one(s)",
                      description="Make a new Ed25519 key for DEVICE: a new bundle (0600, replacing "
                                  "device-DEVICE.json), the new key registered in devices.json and every "
                                  "previously active key of the device revoked. Copy devices.json to the "
                                  "coordinator's --devices path: a running coordinator notices within 2 s (or "
                                  "at once on SIGHUP), records the new key and the revocation in the ledger and "
                                  "rejects the old key's updates as revoked_key. Install the new bundle on the "
                                  "device.")
    a.add_argument("device")
    a = ks.add_parser("revoke", help="revoke a device key (its updates are rejected from then on)")
    a.add_argument("device")
    a.add_argument("key_id")
    a = ks.add_parser("nats-config", help="write the NATS authorization block (users, bcrypt hashes, permissions) "
                                         "and, with --routes, the authenticated cluster routes",
                      description="Write the `authorization { users: [...] }` block that a NATS node's config "
                                  "includes (deploy/nats/nats-node.conf): one user per ACL `user` block, per device "
                                  "with an active key (user = device id) and per prediction client, each with the "
                                  "publish/subscribe permissions the ACL gives it (MQTT topics as NATS subjects), "
                                  "MQTT connections only, and a bcrypt hash of its broker/<user>.password. "
                                  "Regenerate after add-device, revoke, add-client or an ACL change (a user whose "
                                  "password is unchanged keeps its hash, so only what changed differs), copy to "
                                  "every node, "
                                  "then `nats-server --signal reload`. The file is 0600. "
                                  "With --routes it also writes the cluster's routes file (--routes-out), which "
                                  "the node config includes inside its cluster block so no node accepts a route "
                                  "without the fleet's route password: the route user, a bcrypt hash of the "
                                  "password in nats-route.json (created once in the keys directory, 0600, and "
                                  "reused, so every node agrees) and a route to every node with the password in "
                                  "clear (a secret, 0600). With --route-tls-cert, --route-tls-key and "
                                  "--route-tls-ca the routes run over mutual TLS: each node needs a certificate of "
                                  "that CA (extended key usages serverAuth and clientAuth, naming the host "
                                  "--routes gives for it).")
    a.add_argument("--out", type=Path, required=True, help="file to write (e.g. /etc/nats/fledger-auth.conf)")
    a.add_argument("--routes", metavar="HOST:PORT,...",
                   help="every node's cluster address (e.g. nats-1:6222,nats-2:6222,nats-3:6222): also write "
                        "the routes file")
    a.add_argument("--routes-out", type=Path,
                   help="the routes file to write (default: fledger-routes.conf beside --out)")
    a.add_argument("--route-tls-cert", metavar="PATH",
                   help="with --routes: each node's route certificate, as a path on the nodes (e.g. "
                        "/etc/nats/route.crt; the same path on every node, a certificate of its own in it)")
    a.add_argument("--route-tls-key", metavar="PATH", help="with --routes: that certificate's key (path on the nodes)")
    a.add_argument("--route-tls-ca", metavar="PATH",
                   help="with --routes: the CA every node's route certificate is checked against (path on the nodes)")
    a.add_argument("--acl", type=Path, help="the ACL to translate (default: fledger's shipped fledger.acl)")
    a.add_argument("--bcrypt-cost", type=int, default=4,
                   help="bcrypt cost (default 4: the passwords are 192-bit random tokens; 10+ for chosen ones)")
    a = ks.add_parser("rabbitmq-definitions",
                      help="write RabbitMQ definitions: users (sha256 hashes), permissions, topic permissions",
                      description="Write a RabbitMQ definitions file (JSON, 0600) that rabbitmq.conf imports at boot "
                                  "(definitions.local.path, deploy/rabbitmq) and `rabbitmqctl import_definitions` "
                                  "applies at runtime: one user per ACL `user` block, per device with an active "
                                  "key (user = device id) and per prediction client, with RabbitMQ's salted sha256 "
                                  "hash of its "
                                  "broker/<user>.password; resource permissions for the MQTT plugin's session "
                                  "queues and amq.topic; and a topic permission on amq.topic whose WRITE and READ "
                                  "regexes allow exactly what the ACL allows (MQTT topics as routing keys, "
                                  "a/b/c = a.b.c). A device or client whose keys are all revoked keeps a user "
                                  "with an empty hash: importing the file locks it out (its open connection "
                                  "stays until `rabbitmqctl delete_user`; import again afterwards). Everything "
                                  "else in the "
                                  "file (vhosts, policies, other users) comes from --base, or from --out as it "
                                  "is. Regenerate after add-device, revoke, add-client or an ACL change (a user "
                                  "whose password is unchanged keeps its hash), then import it on one node of the "
                                  "cluster.")
    a.add_argument("--out", type=Path, required=True, help="file to write (e.g. /etc/rabbitmq/definitions.json)")
    a.add_argument("--base", type=Path,
                   help="definitions to merge into (e.g. deploy/rabbitmq/definitions.json: the vhost and the "
                        "mirroring policy); default: --out as it is, if it exists")
    a.add_argument("--acl", type=Path, help="the ACL to translate (default: fledger's shipped fledger.acl)")
    a = ks.add_parser("list", help="list registered devices and key ids (device, key id, active/revoked)")
    # allow_abbrev=False: `--password SECRET` must be an error, not an abbreviation of --password-file.
    a = ks.add_parser("broker-password", help="set a user's password in an amqtt password file", allow_abbrev=False,
                      description="Append or replace USER in the embedded broker's password file "
                                  "(`fledger broker --password-file`): one user:argon2-hash line per user, "
                                  "file mode 0600. The password is read from --password-file, never from the "
                                  "command line. For mosquitto use mosquitto_passwd.")
    a.add_argument("user", help="broker user name: a device id, 'coordinator', 'monitor', 'operator' or another "
                                "monitor account named in the ACL")
    a.add_argument("--password-file", type=Path, required=True,
                   help="file whose first line is the password (keep it 0600; the client reads the same file)")
    a.add_argument("--out", type=Path, required=True, help="the amqtt password file to update")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except (FileExistsError, KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fledger keys: {message}", file=sys.stderr)
        return 2


def _warn_no_login(directory: Path, skipped: Iterable[str], broker: str) -> None:
    for user in skipped:
        print(f"fledger keys: warning: no {directory / BROKER_DIR / (user + '.password')}: user {user} gets no "
              f"{broker} login", file=sys.stderr)


def _users_listed(users: Iterable[str], broker: str) -> str:
    """``N <broker> users (a, b, c, d, e, f, ...)``: the first six by name."""
    names = sorted(users)
    return f"{len(names)} {broker} users ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"


def _main(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if args.keys_command == "init":
        keys = init_fleet(directory, args.fleet, force=args.force)
        print(f"fleet {keys.fleet}: coordinator keys in {directory / COORDINATOR_FILE} "
              f"(signing key id {keys.public.sign_key_id}); broker logins for {', '.join(ROLE_USERS)} in "
              f"{directory / BROKER_DIR} (`fledger broker` enforces them)")
    elif args.keys_command == "add-device":
        devices = list(args.device)
        if args.count:
            devices += device_ids(args.prefix, args.count, args.start)
        if args.from_file:
            devices += read_device_list(args.from_file)
        if not devices:
            raise ValueError("add-device: name a device, or use --count or --from-file")
        if len(devices) == 1:
            path, key_id = add_device(directory, devices[0], force=args.force)
            print(f"device {devices[0]}: bundle {path} (key id {key_id}) and broker password "
                  f"{directory / BROKER_DIR / (devices[0] + '.password')}; install both on the device only")
        else:
            if args.force:
                raise ValueError("add-device: --force replaces one device's key; use `fledger keys rotate` per device")
            added = add_devices(directory, devices)
            print(f"{len(added)} devices, {devices[0]} ... {devices[-1]}: bundles {directory}/device-<id>.json and "
                  f"broker passwords {directory / BROKER_DIR}/<id>.password; install each pair on its device only")
    elif args.keys_command == "add-client":
        path, key_id = add_client(directory, args.client)
        from fledger.acl import client_acl_text

        print(f"client {args.client}: bundle {path} (key id {key_id}); give it to the client only. The owner "
              f"credits it with `fledger credits deposit {args.client} AMOUNT`. For mosquitto's acl_file "
              f"(the embedded broker, at its next start, `fledger keys nats-config` and `rabbitmq-definitions` "
              f"add it by themselves):\n{client_acl_text(args.client).rstrip()}")
    elif args.keys_command == "rotate":
        path, key_id, revoked = rotate_device_key(directory, args.device)
        print(f"device {args.device}: new key id {key_id} in {path}; revoked {', '.join(revoked) or 'nothing'}. "
              f"Copy {directory / REGISTRY_FILE} to the coordinator's --devices path (a running coordinator "
              "applies it within 2 s), install the new bundle on the device only")
    elif args.keys_command == "revoke":
        revoke_device_key(directory, args.device, args.key_id)
        print(f"revoked key {args.key_id} of {args.device}; a running coordinator reading {directory / REGISTRY_FILE} "
              "applies it within 2 s")
    elif args.keys_command == "nats-config":
        from fledger.nats_auth import (
            RouteTls,
            build_from_keys,
            parse_routes,
            read_hashes,
            render,
            write_routes_config,
        )

        if not 4 <= args.bcrypt_cost <= 31:
            raise ValueError(f"--bcrypt-cost must be 4..31, not {args.bcrypt_cost}")
        if args.routes_out is not None and args.routes is None:
            raise ValueError("--routes-out needs --routes (every node's cluster host:port)")
        routes = parse_routes(args.routes) if args.routes is not None else None
        route_tls = RouteTls.from_options(args.route_tls_cert, args.route_tls_key, args.route_tls_ca)
        if route_tls is not None and routes is None:
            raise ValueError("--route-tls-cert/--route-tls-key/--route-tls-ca need --routes (every node's cluster "
                             "host:port)")
        routes_out = args.routes_out or args.out.with_name("fledger-routes.conf")
        users = build_from_keys(directory, args.acl, rounds=args.bcrypt_cost, previous=read_hashes(args.out))
        atomic_write(args.out, render(users.acl, users.hashes, source=str(args.acl or "fledger.acl")).encode(),
                     mode=0o600)
        if routes is not None:
            write_routes_config(directory, routes, routes_out, rounds=args.bcrypt_cost, tls=route_tls)
        _warn_no_login(directory, users.skipped, "NATS")
        routes_note = (f" and {routes_out} (the routes{' over mutual TLS' if route_tls else ''}, a secret too)"
                       if args.routes is not None else "")
        print(f"{args.out}: {_users_listed(users.hashes, 'NATS')}{routes_note}; copy to every node and "
              "`nats-server --signal reload`")
    elif args.keys_command == "rabbitmq-definitions":
        from fledger.rabbitmq_auth import write_definitions

        fleet = write_definitions(directory, args.out, acl_path=args.acl, base_path=args.base)
        _warn_no_login(directory, fleet.skipped, "RabbitMQ")
        locked = (f"; locked out (keys revoked): {', '.join(fleet.revoked)} (end an open connection with "
                  "`rabbitmqctl delete_user`, then import again)" if fleet.revoked else "")
        print(f"{args.out}: {_users_listed(fleet.passwords, 'RabbitMQ')}"
              f"{locked}; `rabbitmqctl import_definitions {args.out}` on one node (or restart with it)")
    elif args.keys_command == "list":
        registry = DeviceRegistry.load(directory / REGISTRY_FILE)
        for device, record in sorted(registry.devices.items()):
            for key_id in sorted(record.keys):
                print(f"{device}\t{key_id}\t{'revoked' if key_id in record.revoked else 'active'}")
    elif args.keys_command == "broker-password":
        mode = args.password_file.stat().st_mode & 0o777 if args.password_file.exists() else 0
        if mode & 0o077:
            print(f"fledger keys: warning: {args.password_file} is readable by others (mode {mode:o}); "
                  "chmod 600 it", file=sys.stderr)
        write_broker_password(args.out, args.user, read_password_file(args.password_file))
        print(f"broker user {args.user}: password hash written to {args.out}")
    return 0


__all__ = [
    "active_keys",
    "add_client",
    "add_device",
    "add_devices",
    "broker_password_db",
    "broker_users",
    "bundle_path",
    "check_device_id",
    "device_ids",
    "init_fleet",
    "new_broker_user",
    "read_device_list",
    "read_password_file",
    "revoke_device_key",
    "rotate_device_key",
    "write_broker_password",
    "write_secret_json",
]
