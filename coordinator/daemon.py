"""The coordinator daemon: the MQTT shell around :class:`coordinator.service.Coordinator`.

paho's network thread only enqueues messages; this worker thread does all the checking,
decryption, aggregation and disk writes, so a slow step never stalls the MQTT connection.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from coordinator import restore, state_check, state_guard
from coordinator.catch_up import CatchUp, fleet_now
from coordinator.config import DEFAULT_REPLAY_BATCH as DEFAULT_REPLAY_BATCH  # re-exported: the settings moved
from coordinator.config import CoordinatorConfig as CoordinatorConfig  # to a light module for the CLI's parser
from coordinator.config import (
    catch_up_limits,
    check_settings,
    replay_limits,
    round_policy,
    strategy_params,
    upstream_address,
)
from coordinator.gateway import SendUpstream, resume_upstream, serve_upstream, wait_for_upstream_model
from coordinator.observe import Observatory
from coordinator.prediction_daemon import (
    build_prediction_service,
    is_prediction_topic,
    prediction_subscriptions,
    take_batch,
)
from coordinator.publisher import Publisher
from coordinator.registry_file import RegistryFile
from coordinator.replay import ReplayLimiter
from coordinator.restore import RestoreError
from coordinator.service import Coordinator, CoordinatorSettings, Evaluate, Outcome
from coordinator.state_check import StateRefused
from coordinator.stopping import stop_target
from coordinator.storage import ModelStore, Spool, StorageError
from coordinator.twin_watch import TwinWatch
from coordinator.upstream import Upstream
from federation import envelope, exit_codes
from federation.chunk_record import ChunkRecord
from federation.config import ConfigError
from federation.crypto import ed25519_public
from federation.fleet_state import FleetLedger
from federation.keys import CoordinatorKeys, DeviceBundle, DeviceRegistry
from federation.model_init import initial_weights, task_layers
from federation.mqtt import LIVENESS_PERIODS, BrokerConfig, Message, MqttLink, take_following
from federation.outbox import Outbox
from federation.systemd import Notifier
from federation.topics import Topics
from ledger import Ed25519Signer, LedgerCorrupt

log = logging.getLogger(__name__)


def load_keys(config: CoordinatorConfig) -> CoordinatorKeys:
    keys = CoordinatorKeys.load(config.keys)
    if keys.fleet != config.fleet:
        raise ValueError(f"key file {config.keys} is for fleet {keys.fleet!r}, not {config.fleet!r}")
    return keys


def load_registry(config: CoordinatorConfig) -> DeviceRegistry:
    if not Path(config.devices).is_file():  # a typo must not start a fleet that accepts no device
        raise ConfigError(f"device registry {config.devices} not found (create it with `fledger keys add-device`)")
    return DeviceRegistry.load(config.devices)


def open_ledger(config: CoordinatorConfig, keys: CoordinatorKeys) -> FleetLedger:
    state = Path(config.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    return FleetLedger.open(state / "ledger.log", signer=Ed25519Signer(keys.sign_seed), fleet=config.fleet,
                       difficulty=config.difficulty)


def build_coordinator(config: CoordinatorConfig, publish: Any, *, evaluate: Evaluate | None = None,
                      ledger: FleetLedger | None = None, publisher: Publisher | None = None,
                      upstream_model: dict[str, Any] | None = None,
                      send_upstream: SendUpstream | None = None) -> Coordinator:
    policy = round_policy(config)  # checked before any file is opened
    params = strategy_params(config)
    keys = load_keys(config)
    registry = load_registry(config)
    state = Path(config.state_dir)
    if ledger is None:
        ledger = open_ledger(config, keys)
    task_layers(config.task, config.csv_features)  # an unknown task or missing --csv-features fails now

    def initial_model() -> dict[str, Any]:
        if upstream_model is not None:  # a gateway starts from its upstream's model
            return upstream_model
        # numpy, not torch: a coordinator that does not evaluate runs without torch installed.
        return initial_weights(config.task, config.csv_features, config.seed)

    if evaluate is None and config.evaluate:
        evaluate = make_evaluator(config.task)
    settings = CoordinatorSettings(
        fleet=config.fleet,
        policy=policy,
        strategy=config.strategy, strategy_params=params, max_rounds=config.rounds,
        stop_at=stop_target(config.stop_at, task=config.task, evaluates=evaluate is not None),
        max_update_bytes=config.max_update_bytes, keep_models=config.keep_models, heartbeat_s=config.heartbeat,
        mode=config.mode, max_staleness=config.max_staleness,
    )
    return Coordinator(settings, keys, registry, ledger, ModelStore(state / "models"), Spool(state / "spool"),
                       initial_model=initial_model, publish=publish, topics=Topics(config.fleet, config.topic_prefix),
                       evaluate=evaluate, task_info={"task": config.task}, publisher=publisher,
                       send_upstream=send_upstream)


def make_evaluator(task_name: str) -> Evaluate:
    """Central evaluation of each new global model on the task's held-out test set."""
    import torch

    from federation.evaluation import evaluate
    from federation.tasks import central_test_set, get_task

    task = get_task(task_name)
    test_x, test_y = central_test_set(task)
    model = task.build_model()

    def run_eval(weights: dict[str, Any]) -> dict[str, float]:
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in weights.items()})
        return evaluate(model, test_x, test_y, task.kind)

    return run_eval


REGISTRY_CHECK_S = 2.0  # how often devices.json is checked for added, rotated or revoked keys


def run(config: CoordinatorConfig, *, stop: threading.Event | None = None) -> int:
    """Run until ``rounds`` are done or a signal arrives. Returns a process exit code."""
    stop = stop or threading.Event()
    # Threads waiting to run Python (the worker back from a write or an fsync, the network thread
    # back from recv) wait at most this long for the one running: with the default 5 ms, each of
    # the worker's ~100 file system calls per batch could wait 5 ms behind the network thread's
    # reassembly or a verdict (beside one busy thread, spooling a 424 KB update took ~3.6 ms at
    # 5 ms, ~0.3 ms at 1 ms; bench/fleet.py at N = 1,000: ~20 % more updates/s at 0.5 ms).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if threading.current_thread() is threading.main_thread():
        # From the first moment: a SIGTERM during the start-up checks ends the process cleanly.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    # Everything local is checked before connecting: settings, keys, registry, task, state.
    check_settings(config)
    keys = load_keys(config)
    load_registry(config)
    task_layers(config.task, config.csv_features)
    state_dir = Path(config.state_dir)
    try:
        lock = state_guard.lock_state_dir(state_dir)
    except StateRefused as exc:
        log.error("start refused: %s", exc)
        return exit_codes.STATE
    try:
        topics = Topics(config.fleet, config.topic_prefix)
        with Observatory(topics, task=config.task, metrics_host=config.metrics_host, metrics_port=config.metrics_port,
                         dashboard_host=config.dashboard_host, dashboard_port=config.dashboard_port) as observatory:
            return _run_locked(config, keys, observatory, stop)
    except (StateRefused, LedgerCorrupt) as exc:
        log.error("start refused: %s", exc)
        return exit_codes.STATE
    finally:
        os.close(lock)


def _run_locked(config: CoordinatorConfig, keys: CoordinatorKeys, observatory: Observatory,
                 stop: threading.Event) -> int:
    state_dir = Path(config.state_dir)
    coordinator_key = ed25519_public(keys.sign_seed)
    heads = [h for h in [state_guard.read_checkpoint(state_dir, coordinator_key)] if h is not None]
    log_path = state_dir / "ledger.log"
    # An empty or missing ledger.log is not opened yet: opening writes a new genesis block.
    ledger = open_ledger(config, keys) if log_path.exists() and log_path.stat().st_size else None
    topics = Topics(config.fleet, config.topic_prefix)
    client_id = config.client_id or f"fledger-coordinator-{config.fleet}"
    head = state_guard.broker_head(config, topics, f"{client_id}-probe", coordinator_key, config.head_wait,
                                   heartbeat=config.heartbeat, stop=stop)
    if stop.is_set():
        if ledger is not None:
            ledger.close()
        return exit_codes.OK  # stopped while looking at the broker
    if head is not None:
        heads.append(head)
    try:
        note = state_check.check(state_guard.evidence(state_dir, ledger, heads), new_chain=config.new_chain)
    except StateRefused:
        if ledger is not None:
            ledger.close()
        raise
    if note:
        log.info("state check: %s", note)
    # Reassemble no chunked message larger than the largest update we would accept anyway.
    link_config = dataclasses.replace(config, max_message_bytes=min(config.max_message_bytes, config.max_update_bytes))
    link = MqttLink(link_config, client_id,
                    subscriptions=[topics.updates, topics.registrations, topics.presences, topics.ledger_replays,
                                   topics.catch_up_requests, *prediction_subscriptions(topics),
                                   # another writer of our ledger, and the status a stopping twin
                                   # published over ours (coordinator/twin_watch.py; a large fleet's
                                   # status comes as chunks)
                                   topics.ledger_head, topics.ledger_head_chunks, topics.status_chunks],
                    chunk_record=ChunkRecord(state_dir / "retained_chunks.json"))
    replay = ReplayLimiter(replay_limits(config), clock=time.monotonic, counted=observatory.replay_answered)
    catch_up = CatchUp(topics, catch_up_limits(config), clock=time.monotonic, counted=observatory.catch_up_answered)

    def publish(topic: str, payload: bytes, retain: bool) -> None:
        observatory.published(topic, payload)
        # Chunked if larger than the broker's payload limit; chunk topics an earlier, larger message
        # left (also before a restart: retained_chunks.json) are cleared, and only those.
        link.publish(topic, payload, retain=retain)

    checkpoint = state_guard.CheckpointFile(state_dir)
    twin_watch = TwinWatch(config.fleet, coordinator_key, start_height=head.height if head is not None else None,
                           counted=observatory.head_seen)
    publisher = Publisher(publish, topics, keys, on_head=checkpoint.offer)

    link.watch(topics.status, LIVENESS_PERIODS * config.heartbeat)  # our own status is the echo
    reload_now = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: reload_now.set())  # `systemctl reload`
    notifier = Notifier()
    if not link.start(timeout=60, stop=stop):
        return 0  # stopped while connecting
    upstream_link, upstream = _start_upstream(config, stop, observatory) if config.upstream else (None, None)
    if config.upstream and upstream is None:
        link.stop()
        return 0  # stopped while waiting for the upstream's model
    registry_file = RegistryFile(config.devices)  # before loading it: a change in between is seen

    def send_upstream(change: dict[str, Any], samples: int, metrics: dict[str, float]) -> None:
        assert upstream is not None
        # With the data set its devices have registered now (registered upstream with the update,
        # if changed): once per upstream round however often they change (docs/protocol.md).
        upstream.send(change, samples, metrics, coordinator.datasets, time.monotonic())

    coordinator = build_coordinator(
        config, publish, ledger=ledger, publisher=publisher,
        upstream_model=upstream.model[1] if upstream is not None and upstream.model else None,
        send_upstream=send_upstream if upstream is not None else None)
    observatory.catch_up(coordinator.ledger)
    try:
        pending_restore = restore.read_request(state_dir)
    except RestoreError:
        pending_restore = None  # refused, with why, when the loop applies it
    try:
        coordinator.start(pending_restore)
    except StorageError as exc:  # a missing or damaged model or spool file the ledger names
        link.stop()
        raise StateRefused(str(exc)) from None
    if upstream is not None:
        resume_upstream(coordinator, upstream)
    if pending_restore is not None and pending_restore.lost_updates:
        restore.apply_request(coordinator, state_dir)  # before any tick could close the round short
    notifier.ready(f"fleet {config.fleet}: connected, ledger height {coordinator.ledger.head.index + 1}")
    clients_file = RegistryFile(config.clients)

    def publish_reply(topic: str, payload: bytes, correlation: bytes | None = None) -> None:
        # A large reply (many rows) is chunked like a model; over MQTT 5 it echoes the request's
        # Correlation Data (docs/predictions.md).
        link.publish(topic, payload, chunked=True, correlation=correlation)

    predictions = build_prediction_service(config, coordinator, publish_reply)
    connects = link.connect_count
    last_tick = last_registry_check = 0.0
    last_status = time.monotonic()
    pending: Message | None = None
    ahead: list[Message] | None = None  # the next batch of updates, being opened while this one is made durable
    try:
        while not stop.is_set():
            notifier.alive()
            message: Message | None
            updates: list[Message] | None = None
            if ahead is not None:  # taken from the inbox behind a batch and opened: handled now, in order
                updates, ahead = ahead, None
                message = updates[0]
                link.hold(updates, held=False)
            elif pending is not None:  # taken from the inbox behind a batch: handled now, in order
                message, pending = pending, None
            else:
                try:
                    message = link.inbox.get(timeout=0.5)
                except queue.Empty:
                    message = None
            try:
                if link.connect_count != connects:
                    # The broker may have restarted and lost retained messages: publish them again.
                    connects = link.connect_count
                    coordinator.publish_retained()
                if message is not None and message.topic == topics.ledger_head:
                    another_writer = twin_watch.check(message.payload, retained=message.retain,
                                                      height=coordinator.ledger.head.index + 1,
                                                      hash_at=lambda index: coordinator.ledger.block(index).hash,
                                                      genesis_timestamp=coordinator.ledger.block(0).timestamp)
                    if another_writer is not None:
                        log.error("%s", another_writer)
                        return exit_codes.STATE  # at once: no further block, model, ack or status from us
                elif message is not None and message.topic == topics.status:  # our own echo, mostly
                    twin_watch.note_status(message.payload, session=coordinator.session, retained=message.retain)
                elif message is not None and is_prediction_topic(topics, message.topic) and not coordinator.halted:
                    batch, pending = take_batch(message, link.inbox, topics)
                    predictions.handle_batch(batch)
                elif updates is not None or (message is not None and _is_update(topics, message.topic)
                                             and not coordinator.halted):
                    # The updates already waiting, checked one by one, made durable together
                    # (one ledger fsync); the first other message taken is handled next. The
                    # batch behind them is taken too and opened (signatures, decryption) on the
                    # admission threads while this one is written and fsynced.
                    if updates is None:
                        assert message is not None
                        updates, pending = take_updates(message, link.inbox, topics)
                        coordinator.intake.open_ahead([(m.topic, m.payload) for m in updates])
                    if pending is None:
                        ahead, pending = take_ahead(link.inbox, topics)
                        if ahead is not None:  # still counted in the inbox's budget (memory)
                            link.hold(ahead)
                            coordinator.intake.open_ahead([(m.topic, m.payload) for m in ahead])
                    outcomes = coordinator.handle_updates([(m.topic, m.payload) for m in updates])
                    for update, update_outcome in zip(updates, outcomes, strict=True):
                        observatory.outcome("update", update_outcome, update.received)
                elif message is not None:
                    kind, outcome = _dispatch(coordinator, link, topics, message.topic, message.payload, replay,
                                              catch_up)
                    observatory.outcome(kind, outcome, message.received)
            except Exception:  # one bad message or a bug must not end the daemon
                log.exception("unexpected error handling a message; continuing")
            try:  # apart from message handling, so that no stream of messages can starve it
                now = time.monotonic()
                if upstream is not None and upstream_link is not None:
                    serve_upstream(coordinator, upstream, upstream_link.inbox, now)
                if (other := twin_watch.reclaim_due(now)) is not None:
                    log.warning("the fleet's status was published by another coordinator process with this "
                                "coordinator's key (session %s: a twin, about to stop if it forked): "
                                "publishing our model, status and acknowledgements again", other)
                    coordinator.publish_retained()
                if now - last_tick >= 0.5:
                    last_tick = now
                    coordinator.tick()
                    if coordinator.presence.expire(config.presence_timeout):
                        coordinator.status_changed()
                    link.expire_partial()
                    checkpoint.flush_if_due()
                if now - last_status >= config.heartbeat:  # a heartbeat for agents, an echo for us
                    last_status = now
                    coordinator.publish_status()
                coordinator.publish_status_if_due()  # changes, at a bounded rate
                if reload_now.is_set() or now - last_registry_check >= REGISTRY_CHECK_S:
                    reload_now.clear()
                    last_registry_check = now
                    restore.apply_request(coordinator, Path(config.state_dir))
                    registry = registry_file.changed()
                    if registry is not None:
                        try:
                            coordinator.reload_registry(registry)
                        except Exception as exc:  # KeyFileError, or storage: nothing adopted
                            registry_file.refused(f"{type(exc).__name__}: {exc}")
                        else:
                            registry_file.adopted()
                    clients = clients_file.changed()
                    if clients is not None:
                        predictions.clients = clients
                        clients_file.adopted()
                        log.info("prediction clients reloaded: %d", len(clients.devices))
            except Exception:  # a bug must not end the daemon
                log.exception("unexpected error in the coordinator's periodic work; continuing")
            if link.failed is not None:
                log.critical("stopped: the MQTT link gave up (see above)")
                return exit_codes.UNREACHABLE
            if coordinator.done:
                log.info("training done (--rounds %d, --stop-at %s); ledger height %d", config.rounds,
                         config.stop_at or "none", coordinator.ledger.head.index + 1)
                # Let the last publishes reach the broker before leaving.
                link.publish(topics.status, envelope.seal_status(coordinator.keys, coordinator.status()), retain=True,
                             wait=10)
                break
            if coordinator.halted:
                log.critical("halted: %s", coordinator.halted)
                # Tell devices and operators (retained), so nobody waits for an acknowledgement.
                link.publish(topics.status, envelope.seal_status(coordinator.keys, coordinator.status()), retain=True,
                             wait=10)
                return exit_codes.STATE  # storage failed: restarting will not help until fixed
        # Stopped by a signal: say so, so that a coordinator started next need not wait to see
        # whether this one is still alive.
        coordinator.stopped = True
        link.publish(topics.status, envelope.seal_status(coordinator.keys, coordinator.status()), retain=True, wait=5)
    finally:
        checkpoint.flush()
        notifier.stopping()
        link.stop(timeout=2)
        if upstream_link is not None:
            upstream_link.stop(timeout=2)
        coordinator.close()  # its admission threads
    return 0


def _start_upstream(config: CoordinatorConfig, stop: threading.Event,
                    observatory: Observatory) -> tuple[MqttLink | None, Upstream | None]:
    """Connect to the upstream broker as the gateway's device and wait for the upstream's model."""
    host, port = upstream_address(config)
    assert config.upstream_bundle is not None  # checked by upstream_address
    bundle = DeviceBundle.load(config.upstream_bundle)
    broker = dataclasses.replace(BrokerConfig(), broker_host=host, broker_port=port,
                                 username=config.upstream_username, password_file=config.upstream_password_file,
                                 topic_prefix=config.topic_prefix, max_payload=config.max_payload)
    upstream_topics = Topics(bundle.fleet, config.topic_prefix)
    link = MqttLink(broker, f"fledger-gateway-{config.fleet}-{bundle.device_id}", subscriptions=[])
    upstream = Upstream(bundle, upstream_topics, lambda topic, payload: link.publish(topic, payload, qos=1),
                        Outbox(Path(config.state_dir) / "upstream-outbox"), on_left_out=observatory.upstream_left_out)
    link.subscriptions = upstream.subscriptions
    if not link.start(timeout=60, stop=stop):
        return None, None
    log.info("gateway: device %s of fleet %s upstream at %s; waiting for its model", bundle.device_id, bundle.fleet,
             config.upstream)
    if not wait_for_upstream_model(upstream, link.inbox, stop):
        link.stop(timeout=2)
        return None, None
    return link, upstream


SWITCH_INTERVAL_S = 0.0005  # the interpreter's thread switch interval in the coordinator (default 0.005)

# At most this many update messages, and bytes of them, per commit group: one fsync for many
# small updates, and the batch's decrypted weights stay small beside the model (the RSS target).
UPDATE_BATCH = 256
UPDATE_BATCH_BYTES = 8 * 1024 * 1024


def _is_update(topics: Topics, topic: str) -> bool:
    device = topics.device_of(topic)
    return device is not None and topic == topics.update(device)


def take_updates(first: Message, inbox: queue.Queue[Message], topics: Topics) -> tuple[list[Message], Message | None]:
    """``first`` and the update messages already queued right behind it (at most UPDATE_BATCH
    and UPDATE_BATCH_BYTES; never waits for more); also the first other message taken, which
    the caller must handle."""
    return take_following(first, inbox, lambda topic: _is_update(topics, topic), max_count=UPDATE_BATCH,
                          max_bytes=UPDATE_BATCH_BYTES)


def take_ahead(inbox: queue.Queue[Message], topics: Topics) -> tuple[list[Message] | None, Message | None]:
    """The next batch of updates if an update is next in the inbox (:func:`take_updates`), and
    the first other message taken; never waits."""
    try:
        message = inbox.get_nowait()
    except queue.Empty:
        return None, None
    if not _is_update(topics, message.topic):
        return None, message
    return take_updates(message, inbox, topics)


def _dispatch(coordinator: Coordinator, link: MqttLink, topics: Topics, topic: str, payload: bytes,
              replay: ReplayLimiter, catch_up: CatchUp) -> tuple[str, Outcome | None]:
    """Hand one message to the coordinator; returns what kind it was and the Outcome if any."""
    device = topics.device_of(topic)
    if device and topic == topics.update(device):
        return "update", coordinator.handle_update(topic, payload)
    if device and topic == topics.register(device):
        return "registration", coordinator.handle_registration(topic, payload)
    if device and topic == topics.presence(device):
        if coordinator.handle_presence(topic, payload):
            coordinator.status_changed()
    elif (requester := topics.replay_requester_of(topic)) is not None:
        replay.serve(requester, payload, coordinator.ledger, link.publish_all, topics.ledger_blocks)  # replay.py
    elif (requester := topics.catch_up_requester_of(topic)) is not None:
        catch_up.serve(requester, payload, fleet_now(coordinator), link.publish_all)  # coordinator/catch_up.py
    # anything else (amqtt hands out retained messages of other topics) is ignored
    return "other", None

